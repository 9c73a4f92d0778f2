"""The watchdog's decisions, against a real local HTTP server standing in for RunPod / Lambda."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from loraburst.remote.protocol import CONTROL_FILE, EVENTS_FILE, HEARTBEAT_FILE, read_events
from loraburst.remote.watchdog import SelfTerminator, Watchdog

from tests.remote._cloud import Cloud

KEY = "rpa_SECRET_pod_scoped_key_123"


def _runpod_env(cloud: Cloud, pod: str = "pod-abc", **extra: str) -> dict[str, str]:
    """A pod's environment: its own pod-scoped key, plus the terminate request the RunPod
    provider hands the agent (built by the provider itself, as the runner does)."""
    from loraburst.providers import Machine
    from loraburst.providers.runpod import RunPodProvider

    machine = Machine(provider="runpod", id=pod, tag="lb-t", status="running")
    request = RunPodProvider(api_key="account-key", base_url=cloud.url).self_termination(machine)
    assert request is not None and "account-key" not in str(request.to_env())
    return {"RUNPOD_POD_ID": pod, "RUNPOD_API_KEY": KEY, **request.to_env(), **extra}


def _touch_heartbeat(workdir: Path, at: float) -> None:
    (workdir / HEARTBEAT_FILE).write_text("")
    os.utime(workdir / HEARTBEAT_FILE, (at, at))


def _events(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / EVENTS_FILE
    return list(read_events(path.read_text())) if path.exists() else []


def test_client_gone_while_training_keeps_training_then_terminates_the_pod(
    tmp_path: Path, cloud: Cloud
) -> None:
    dog = Watchdog(tmp_path, _runpod_env(cloud, LORABURST_HEARTBEAT_GRACE_S="60"))
    t0 = dog.started_at
    _touch_heartbeat(tmp_path, t0)
    assert dog.tick(t0 + 30).client_gone is False

    # Gone past the grace, but training runs: no stop (the client may re-attach), no terminate.
    gone = dog.tick(t0 + 61)
    assert gone.client_gone and gone.stop is None and not gone.terminate
    assert dog.stop_reason is None and cloud.calls == []

    # The client comes back, then leaves again; training ends; now the pod is terminated.
    _touch_heartbeat(tmp_path, t0 + 100)
    assert dog.tick(t0 + 120).client_gone is False
    dog.training_ended = True
    assert dog.tick(t0 + 150).terminate is False  # heartbeat 50 s old: still within grace
    assert dog.tick(t0 + 161).terminate is True
    assert dog.terminated and len(cloud.calls) == 1
    call = cloud.calls[0]
    assert call["path"] == "/graphql" and call["auth"] == f"Bearer {KEY}"
    assert call["body"]["query"] == 'mutation { podTerminate(input: {podId: "pod-abc"}) }'
    kinds = [e["kind"] for e in _events(tmp_path)]
    assert kinds == ["client_gone", "client_back", "client_gone", "self_terminated"]
    # Terminated once, never again.
    assert dog.tick(t0 + 200).terminate is False and len(cloud.calls) == 1
    assert KEY not in (tmp_path / EVENTS_FILE).read_text()


def test_lambda_terminates_only_with_the_opted_in_key(tmp_path: Path, cloud: Cloud) -> None:
    from loraburst.providers import Machine
    from loraburst.providers.lambdalabs import LambdaProvider

    machine = Machine(provider="lambda", id="inst-1", tag="lb-t", status="running")
    url = cloud.url + "/api/v1"
    assert LambdaProvider(api_key=KEY, base_url=url).self_termination(machine) is None
    opted = LambdaProvider(api_key=KEY, base_url=url, self_terminate=True)
    request = opted.self_termination(machine)
    assert request is not None
    env = {"LORABURST_HEARTBEAT_GRACE_S": "10"}
    without_key = Watchdog(tmp_path / "a", env)
    (tmp_path / "a").mkdir()
    assert without_key.terminator is None
    # No way to terminate: training stops instead, and says why.
    decision = without_key.tick(without_key.started_at + 11)
    assert decision.stop == "client_gone" and without_key.stop_reason == "client_gone"
    without_key.training_ended = True
    assert without_key.tick(without_key.started_at + 20).terminate is False
    assert cloud.calls == []

    (tmp_path / "b").mkdir()
    dog = Watchdog(tmp_path / "b", {**env, **request.to_env()})
    dog.training_ended = True
    assert dog.tick(dog.started_at + 11).terminate and dog.terminated
    assert cloud.calls == [
        {
            "path": "/api/v1/instance-operations/terminate",
            "auth": f"Bearer {KEY}",
            "body": {"instance_ids": ["inst-1"]},
        }
    ]
    assert dog.stop_reason is None  # it could terminate, so training was never stopped


def test_deadline_stops_training_then_terminates_after_the_pull_window(
    tmp_path: Path, cloud: Cloud
) -> None:
    dog = Watchdog(tmp_path, _runpod_env(cloud, LORABURST_DEADLINE="1000"), pull_window_s=45)
    assert dog.tick(999).stop is None
    assert dog.tick(1000).stop == "deadline" and dog.stop_reason == "deadline"
    assert not dog.decide(1001).terminate  # still training: save first
    dog.training_ended = True
    assert not dog.decide(1044).terminate  # the client may still be pulling the adapter
    assert dog.tick(1045).terminate and len(cloud.calls) == 1


def test_control_file_stop_and_deadline(tmp_path: Path) -> None:
    # A stop left by an earlier agent (older than this one) is not for this agent.
    (tmp_path / CONTROL_FILE).write_text(json.dumps({"stop": "user"}))
    old = os.stat(tmp_path / CONTROL_FILE).st_mtime - 30
    os.utime(tmp_path / CONTROL_FILE, (old, old))
    dog = Watchdog(tmp_path, {})
    assert dog.tick().stop is None and dog.terminator is None

    (tmp_path / CONTROL_FILE).write_text(json.dumps({"deadline": dog.started_at + 5}))
    assert dog.tick(dog.started_at + 1).stop is None and dog.deadline == dog.started_at + 5
    assert dog.tick(dog.started_at + 6).stop == "deadline"

    fresh = Watchdog(tmp_path / "x", {})
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / CONTROL_FILE).write_text(json.dumps({"stop": "budget"}))
    assert fresh.tick().stop == "budget" and fresh.stop_reason == "budget"
    # The first reason sticks.
    (tmp_path / "x" / CONTROL_FILE).write_text(json.dumps({"stop": "user"}))
    fresh.tick()
    assert fresh.stop_reason == "budget"
    assert [e["reason"] for e in _events(tmp_path / "x") if e["kind"] == "stop_requested"] == [
        "budget"
    ]


@pytest.mark.parametrize("failure", ["http_500", "graphql_errors", "unreachable"])
def test_failed_terminate_is_recorded_and_retried_with_backoff(
    tmp_path: Path, cloud: Cloud, failure: str
) -> None:
    env = _runpod_env(cloud, LORABURST_HEARTBEAT_GRACE_S="1")
    if failure == "http_500":
        cloud.status = 500
    elif failure == "graphql_errors":
        cloud.graphql_errors = True
    else:
        env["LORABURST_TERMINATE_URL"] = "http://127.0.0.1:9/graphql"  # nothing listens there
    dog = Watchdog(tmp_path, env)
    dog.training_ended = True
    t = dog.started_at + 10
    dog.tick(t)
    assert not dog.terminated
    failed = [e for e in _events(tmp_path) if e["kind"] == "self_terminate_failed"]
    assert len(failed) == 1 and "terminate" in failed[0]["error"]
    assert KEY not in (tmp_path / EVENTS_FILE).read_text()
    calls = len(cloud.calls)
    dog.tick(t + 1)  # inside the backoff: no new call
    assert len(cloud.calls) == calls
    cloud.status, cloud.graphql_errors = 200, False
    dog.terminator = SelfTerminator.from_env(_runpod_env(cloud))
    dog.tick(t + 3)
    assert dog.terminated and cloud.calls[-1]["auth"] == f"Bearer {KEY}"


def test_terminator_repr_hides_the_key(cloud: Cloud) -> None:
    terminator = SelfTerminator.from_env(_runpod_env(cloud))
    assert terminator is not None and KEY not in repr(terminator)
    assert SelfTerminator.from_env({"RUNPOD_POD_ID": "p"}) is None  # no request given
    no_key = _runpod_env(cloud)
    del no_key["RUNPOD_API_KEY"]
    assert SelfTerminator.from_env(no_key) is None  # the variable named for the token is empty
    # A pod id is quoted as a GraphQL string, so it cannot inject into the mutation.
    odd = SelfTerminator.from_env(_runpod_env(cloud, pod='x"}) { evil'))
    assert odd is not None and odd.graphql
    assert json.loads(odd.body)["query"] == (
        'mutation { podTerminate(input: {podId: "x\\"}) { evil"}) }'
    )


def test_a_held_instance_is_not_terminated_until_the_hold_ends(
    tmp_path: Path, cloud: Cloud
) -> None:
    """The client could not store the adapter (a full disk) and keeps the instance for
    `loraburst attach`: the watchdog must not destroy the only copy meanwhile."""
    env = _runpod_env(cloud, LORABURST_HEARTBEAT_GRACE_S="60", LORABURST_DEADLINE="0")
    dog = Watchdog(tmp_path, env, pull_window_s=45)
    t0 = dog.started_at
    _touch_heartbeat(tmp_path, t0)
    dog.training_ended = True
    (tmp_path / CONTROL_FILE).write_text(json.dumps({"hold_until": t0 + 3600}))
    # Client gone and the deadline long past: both would terminate, but the hold wins.
    decision = dog.tick(t0 + 3000)
    assert decision.client_gone and not decision.terminate and cloud.calls == []
    # The hold is bounded: after it, an abandoned instance is terminated as before.
    assert dog.tick(t0 + 3601).terminate and len(cloud.calls) == 1


def test_a_deadline_stop_carries_the_cap_that_set_it(tmp_path: Path) -> None:
    """The client says which cap the deadline enforces; the stop reason is that cap, so the
    result can say "budget_exhausted" without re-deriving it."""
    dog = Watchdog(tmp_path, {"LORABURST_DEADLINE": "100", "LORABURST_DEADLINE_REASON": "budget"})
    assert dog.tick(101).stop == "budget" and dog.stop_reason == "budget"
    plain = Watchdog(tmp_path / "x", {"LORABURST_DEADLINE": "100"})
    (tmp_path / "x").mkdir()
    assert plain.tick(101).stop == "deadline"
