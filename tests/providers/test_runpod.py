"""RunPod: the official SDK and our client against the emulator; errors, retries, billing."""

from __future__ import annotations

import contextlib
import json
import shlex
import time

import httpx
import pytest
from loraburst._exceptions import (
    AuthError,
    CapacityError,
    ProviderAPIError,
    RateLimitError,
    TransportError,
)
from loraburst.providers import LaunchRequest, Offer, _keys
from loraburst.providers.runpod import GPU_NAMES, RunPodProvider

from tests.fakes.runpod import CAPACITY_MESSAGE, RunPodFake
from tests.providers._launch import launched


def _offer(gpu_id: str = "NVIDIA GeForce RTX 4090") -> Offer:
    return Offer("runpod", GPU_NAMES[gpu_id], 1, 24, 0.69, gpu_id)


def _request(tag: str = "lb-job-1", **env: str) -> tuple[LaunchRequest, object]:
    key_path, public = _keys.generate_key(tag)
    return LaunchRequest(tag=tag, offer=_offer(), public_key=public, env=env), key_path


def test_official_sdk_create_get_terminate(
    runpod_fake: RunPodFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runpod

    monkeypatch.setenv("RUNPOD_API_BASE_URL", runpod_fake.url)
    monkeypatch.setattr(runpod, "api_key", runpod_fake.api_key)
    pod = runpod.create_pod(
        "sdk-pod",
        "runpod/pytorch",
        "NVIDIA GeForce RTX 4090",
        ports="22/tcp",
        env={"PUBLIC_KEY": "ssh-ed25519 AAAAC3Nza sdk"},
    )
    assert pod["machine"]["podHostId"].startswith(pod["id"])
    assert pod["env"] == ["PUBLIC_KEY=ssh-ed25519 AAAAC3Nza sdk"]
    seen = [runpod.get_pod(pod["id"])["runtime"] for _ in range(4)]
    assert seen[0] is None and seen[-1]["ports"][0]["privatePort"] == 22
    assert [p["name"] for p in runpod.get_pods()] == ["sdk-pod"]
    runpod.terminate_pod(pod["id"])
    assert runpod.get_pod(pod["id"]) is None
    with pytest.raises(runpod.error.QueryError, match="pod not found to terminate"):
        runpod.terminate_pod(pod["id"])
    assert runpod_fake.running() == []
    assert runpod_fake.billed_seconds(pod["id"]) >= 1


def test_sdk_bad_key_is_http_401(runpod_fake: RunPodFake, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpod

    monkeypatch.setenv("RUNPOD_API_BASE_URL", runpod_fake.url)
    monkeypatch.setattr(runpod, "api_key", "nope")
    with pytest.raises(runpod.error.AuthenticationError):
        runpod.get_pods()


def test_graphql_variables_and_schema_errors(runpod_fake: RunPodFake) -> None:
    headers = {"Authorization": f"Bearer {runpod_fake.api_key}"}
    q = "query G($id: String) { gpuTypes(input: {id: $id}) { id memoryInGb } }"
    r = httpx.post(
        f"{runpod_fake.url}/graphql",
        json={"query": q, "variables": {"id": "NVIDIA H200"}},
        headers=headers,
    )
    assert r.status_code == 200
    assert r.json()["data"]["gpuTypes"] == [{"id": "NVIDIA H200", "memoryInGb": 141}]
    bad = httpx.post(
        f"{runpod_fake.url}/graphql",
        json={"query": "{ gpuTypes { noSuchField } }"},
        headers=headers,
    )
    assert bad.status_code == 400 and "noSuchField" in bad.json()["errors"][0]["message"]
    # The catalog is readable without a key; pods are not.
    assert httpx.post(
        f"{runpod_fake.url}/graphql", json={"query": "{ gpuTypes { id } }"}
    ).is_success
    assert (
        httpx.post(f"{runpod_fake.url}/graphql", json={"query": "{ myself { id } }"}).status_code
        == 401
    )


def test_offers_map_gpu_ids_and_stock(runpod_provider: RunPodProvider) -> None:
    all_offers = runpod_provider.offers()
    offers = {o.instance_type: o for o in all_offers if o.gpu_count == 1}
    assert offers["NVIDIA H100 80GB HBM3"].gpu == "H100 SXM"
    assert offers["NVIDIA GeForce RTX 4090"].price_per_hour == 0.69
    assert offers["NVIDIA H200"].available is False
    assert {o.billing_increment_s for o in all_offers} == {1}
    # Pods of 2, 4 and 8 GPUs where RunPod has them now, at gpuCount x the GPU's rate.
    counts = {o.gpu_count: o for o in all_offers if o.gpu == "RTX 3090"}
    assert set(counts) == {1, 2, 4, 8}
    assert counts[2].price_per_hour == pytest.approx(2 * 0.43)
    assert not any(o.gpu_count > 1 for o in all_offers if o.gpu == "H200")  # none in stock


def test_missing_key_names_the_env_var_before_any_request(runpod_fake: RunPodFake) -> None:
    provider = RunPodProvider(base_url=runpod_fake.url)
    with pytest.raises(AuthError, match="LORABURST_RUNPOD_API_KEY or RUNPOD_API_KEY"):
        provider.offers()
    assert runpod_fake.requests == 0


def test_key_from_environment(runpod_fake: RunPodFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", runpod_fake.api_key)
    assert RunPodProvider(base_url=runpod_fake.url).offers()
    monkeypatch.setenv("LORABURST_RUNPOD_API_KEY", "wins-over-runpod-api-key")
    with pytest.raises(AuthError):
        RunPodProvider(base_url=runpod_fake.url).offers()


def test_bad_key_creates_nothing(runpod_fake: RunPodFake) -> None:
    provider = RunPodProvider("wrong", base_url=runpod_fake.url)
    request, _ = _request()
    with pytest.raises(AuthError, match="HTTP 401"):
        provider.launch(request)
    assert runpod_fake.pods == {}


def test_capacity_error_keeps_runpod_message(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    runpod_fake.set_stock("NVIDIA GeForce RTX 4090", None)
    request, _ = _request()
    with pytest.raises(CapacityError) as info:
        runpod_provider.launch(request)
    assert str(info.value) == CAPACITY_MESSAGE
    assert runpod_fake.pods == {}


def test_429_waits_for_retry_after(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    runpod_fake.faults.rate_limit = 2
    runpod_fake.faults.retry_after = 0.4
    t0 = time.monotonic()
    assert runpod_provider.offers()
    assert time.monotonic() - t0 >= 0.8


def test_429_forever_is_rate_limit_error(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    runpod_fake.faults.rate_limit = 100
    runpod_fake.faults.retry_after = 0
    with pytest.raises(RateLimitError):
        runpod_provider.offers()
    assert runpod_fake.requests == 4  # max_attempts of the fixture's provider


def test_5xx_is_retried_for_reads(runpod_fake: RunPodFake, runpod_provider: RunPodProvider) -> None:
    runpod_fake.faults.server_error = 2
    assert runpod_provider.offers()
    runpod_fake.faults.server_error = 10
    with pytest.raises(ProviderAPIError, match="HTTP 500"):
        runpod_provider.offers()


def test_lost_create_reply_finds_the_pod_instead_of_creating_twice(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    runpod_fake.faults.lose_create = 1
    request, _ = _request("lb-lost-1")
    machine = runpod_provider.launch(request)
    assert machine.tag == "lb-lost-1"
    assert list(runpod_fake.pods) == [machine.id]


def test_terminate_failure_surfaces_then_succeeds(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    request, _ = _request()
    machine = runpod_provider.launch(request)
    runpod_fake.faults.terminate_fails = 1
    with pytest.raises(ProviderAPIError, match="Something went wrong"):
        runpod_provider.terminate(machine.id)
    assert runpod_fake.running() == [machine.id]
    runpod_provider.terminate(machine.id)
    assert runpod_fake.running() == [] and runpod_provider.get(machine.id) is None


def test_env_and_public_key_reach_the_pod(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    request, _ = _request("lb-env-1", HELLO='it\'s "quoted" $x')
    machine = runpod_provider.launch(request)
    env = runpod_fake.pods[machine.id].data["env"]
    assert env["PUBLIC_KEY"] == request.public_key
    assert env["HELLO"] == 'it\'s "quoted" $x'
    assert runpod_fake.pods[machine.id].data["input"]["ports"] == "22/tcp"


def test_ssh_never_ready_terminates_the_pod(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    runpod_fake.faults.no_sshd = True
    provider = RunPodProvider(runpod_fake.api_key, base_url=runpod_fake.url, connect_timeout_s=2)
    with pytest.raises(TransportError) as info:
        launched(provider, _offer(), "nossh")
    assert "Connection refused" in str(info.value) or "Errno" in str(info.value)
    assert runpod_fake.running() == []
    pod = runpod_fake.pod_by_name("lb-nossh-1")
    assert pod is not None and pod.status == "TERMINATED"


def test_slow_readiness_is_waited_for(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    runpod_fake.faults.ready_polls = 5
    runpod_fake.faults.sshd_delay_s = 1.0
    run = launched(runpod_provider, _offer(), "slow")
    assert run.machine is not None and run.machine.ready(RunPodProvider.capabilities)
    assert runpod_fake.running() == [run.machine.id]
    run.teardown()
    assert runpod_fake.running() == []


def test_pod_scoped_key_terminates_its_own_pod_from_inside(
    runpod_fake: RunPodFake, runpod_provider: RunPodProvider
) -> None:
    """The on-instance watchdog's path: RUNPOD_API_KEY + RUNPOD_POD_ID -> podTerminate."""
    run = launched(runpod_provider, _offer(), "self")
    machine, host = run.machine, run.host
    assert machine is not None and host is not None
    other, _ = _request("lb-other-1")
    other_pod = runpod_provider.launch(other)
    code = (
        "import json,os,sys,urllib.request as u\n"
        "pod=sys.argv[1] if len(sys.argv)>1 else os.environ['RUNPOD_POD_ID']\n"
        "q={'query':'mutation T($i: PodTerminateInput!){podTerminate(input:$i)}',"
        "'variables':{'i':{'podId':pod}}}\n"
        "r=u.Request(os.environ['RUNPOD_API_BASE_URL']+'/graphql',json.dumps(q).encode(),"
        "{'Authorization':'Bearer '+os.environ['RUNPOD_API_KEY'],"
        "'Content-Type':'application/json'})\n"
        "print(u.urlopen(r).read().decode())\n"
    )
    try:
        rc, out, err = host.run(f"{host.python} -c {shlex.quote(code)} {other_pod.id}")
        assert rc == 0, err
        assert "Unauthorized" in json.loads(out)["errors"][0]["message"]
        assert other_pod.id in runpod_fake.running()
        # The pod kills its own sshd: the session may drop before the reply arrives.
        with contextlib.suppress(TransportError):
            host.run(f"{host.python} -c {shlex.quote(code)}", timeout=10)
    finally:
        host.close()
    assert runpod_fake.pods[machine.id].status == "TERMINATED"
    assert runpod_fake.running() == [other_pod.id]
