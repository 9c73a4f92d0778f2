"""The watchdog inside a real agent: a silent client, with and without a way to terminate."""

from __future__ import annotations

import json
from pathlib import Path

from loraburst.remote.protocol import METRICS_FILE, verify_manifest

from tests.remote._cloud import Cloud
from tests.remote._workdir import FAST, events, log, make_workdir, run_agent, state

KEY = "rpa_pod_key_never_logged"


def test_client_gone_pod_finishes_training_then_terminates_itself(
    tiny_model: Path, tmp_path: Path, cloud: Cloud
) -> None:
    workdir = make_workdir(
        tmp_path, tiny_model, train={**FAST, "max_steps": 3, "save_every_steps": None}
    )
    from loraburst.providers import Machine
    from loraburst.providers.runpod import RunPodProvider

    pod = Machine(provider="runpod", id="pod-7", tag="lb-t", status="running")
    request = RunPodProvider(api_key="account", base_url=cloud.url).self_termination(pod)
    assert request is not None
    env = {
        "RUNPOD_POD_ID": "pod-7",
        "RUNPOD_API_KEY": KEY,  # the pod's own key, which the request names
        **request.to_env(),
        "LORABURST_HEARTBEAT_GRACE_S": "1",  # nobody touches the heartbeat: gone within seconds
    }
    assert run_agent(workdir, env, timeout=120) == 0, log(workdir)
    st = state(workdir)
    # Training was not cut short: the pod could terminate itself, so it finished first.
    assert (st.phase, st.step, st.stop_reason) == ("done", 3, None)
    kinds = [e["kind"] for e in events(workdir)]
    assert "client_gone" in kinds and kinds.index("done") < kinds.index("self_terminated")
    assert [c["body"]["query"] for c in cloud.calls] == [
        'mutation { podTerminate(input: {podId: "pod-7"}) }'
    ]
    assert cloud.calls[0]["auth"] == f"Bearer {KEY}"
    for name in ("agent.log", "events.jsonl", "state.json", METRICS_FILE):
        assert KEY not in (workdir / name).read_text()


def test_client_gone_without_a_terminate_key_stops_and_says_so(
    tiny_model: Path, tmp_path: Path
) -> None:
    workdir = make_workdir(tmp_path, tiny_model, train={**FAST, "max_steps": 200})
    env = {"LORABURST_HEARTBEAT_GRACE_S": "1"}  # no terminate request: the client gave none
    assert run_agent(workdir, env, timeout=120) == 0, log(workdir)
    st = state(workdir)
    assert (st.phase, st.stop_reason) == ("stopped", "client_gone")
    assert 1 <= st.step < 200
    metrics = json.loads((workdir / METRICS_FILE).read_text())
    assert metrics["stop_reason"] == "client_gone" and metrics["steps"] == st.step
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert verify_manifest(workdir, manifest) == []
    assert (workdir / "checkpoints" / f"checkpoint-{st.step}" / "trainer_state.json").is_file()
