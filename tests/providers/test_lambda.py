"""Lambda Cloud: the client against the emulator; keys, rate limits, errors and billing."""

from __future__ import annotations

import time

import httpx
import pytest
from loraburst._exceptions import AuthError, CapacityError, ProviderAPIError
from loraburst.providers import LaunchRequest, Offer, _keys
from loraburst.providers.lambdalabs import LambdaProvider

from tests.fakes.lambdalabs import LambdaFake
from tests.providers._launch import launched


def _offer(itype: str = "gpu_1x_a10", region: str | None = "us-east-1") -> Offer:
    return Offer("lambda", "A10", 1, 24, 0.75, itype, region=region, billing_increment_s=60)


def _request(tag: str = "lb-job-1", **kw: str) -> tuple[LaunchRequest, object]:
    key_path, public = _keys.generate_key(tag)
    return LaunchRequest(tag=tag, offer=_offer(**kw), public_key=public), key_path


def _provider(fake: LambdaFake, **kw: object) -> LambdaProvider:
    opts: dict[str, object] = {
        "base_url": f"{fake.url}/api/v1",
        "ssh_user": "root",
        "ssh_port": fake.ssh_port,
        "launch_interval_s": 0.0,
        "connect_timeout_s": 15,
        "backoff_s": 0.05,
    }
    opts.update(kw)
    return LambdaProvider(fake.api_key, **opts)  # type: ignore[arg-type]


def test_offers_from_instance_types(lambda_provider: LambdaProvider) -> None:
    offers = {o.instance_type: o for o in lambda_provider.offers()}
    assert offers["gpu_1x_h100_sxm5"].gpu == "H100 SXM"
    assert offers["gpu_1x_h100_sxm5"].available is False  # no region with capacity
    assert offers["gpu_1x_a10"].price_per_hour == 0.75
    assert offers["gpu_1x_a10"].region == "us-east-1"
    # Multi-GPU types are offers too, of their GPU count, at the whole instance's price.
    eight = offers["gpu_8x_a100_80gb_sxm4"]
    assert (eight.gpu, eight.gpu_count, eight.price_per_hour) == ("A100 80GB", 8, 14.32)
    assert offers["gpu_2x_a6000"].gpu_count == 2
    assert {o.billing_increment_s for o in offers.values()} == {60}
    assert {o.gpu_count for o in offers.values()} <= set(lambda_provider.capabilities.gpu_counts)


def test_job_key_registered_for_the_launch_and_deleted_after_terminate(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    run = launched(lambda_provider, _offer(), "keys")
    machine, key_path = run.machine, run.key_path
    assert machine is not None and key_path is not None
    inst = lambda_fake.instances[machine.id]
    assert inst.name == "lb-keys-1" and inst.data["ssh_key_names"] == ["lb-keys-1"]
    public = key_path.with_suffix(".pub").read_text().strip()
    assert [k["public_key"].strip() for k in lambda_fake.ssh_keys.values()] == [public]
    assert machine.ssh is not None and machine.ssh.port == lambda_fake.ssh_port
    run.teardown()
    assert lambda_fake.ssh_keys == {}
    assert lambda_fake.running() == []


def test_billing_is_per_minute_from_active(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    run = launched(lambda_provider, _offer(), "bill")
    assert run.machine is not None
    machine = run.machine
    run.teardown()
    assert lambda_fake.billed_seconds(machine.id) == 60
    assert lambda_fake.cost(machine.id) == pytest.approx(0.75 / 60)


def test_launch_rate_limit_is_waited_out(lambda_fake: LambdaFake) -> None:
    """Two launches inside the emulator's window: the second gets 429 and is retried."""
    lambda_fake.launch_interval_s = 1.0
    lambda_fake.faults.retry_after = None  # Lambda documents no Retry-After
    provider = _provider(lambda_fake, backoff_s=0.4, max_attempts=8)
    first = provider.launch(_request("lb-a-1")[0])
    t0 = time.monotonic()
    second = provider.launch(_request("lb-b-1")[0])
    assert time.monotonic() - t0 < 10
    assert lambda_fake.launch_attempts >= 3
    assert set(lambda_fake.running()) == {first.id, second.id}


def test_client_paces_launches_itself(lambda_fake: LambdaFake) -> None:
    lambda_fake.launch_interval_s = 0.8
    provider = _provider(lambda_fake, launch_interval_s=0.8)
    provider.launch(_request("lb-a-1")[0])
    provider.launch(_request("lb-b-1")[0])
    assert lambda_fake.launch_attempts == 2  # never hit the 429


def test_capacity_error_keeps_lambda_message_and_cleans_the_key(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    lambda_fake.faults.capacity = True
    request, _ = _request()
    with pytest.raises(CapacityError, match="Not enough capacity to fulfill launch request"):
        lambda_provider.launch(request)
    assert lambda_fake.instances == {} and lambda_fake.ssh_keys == {}


def test_sold_out_type_is_refused_before_launching(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    request, _ = _request(itype="gpu_1x_h100_sxm5", region=None)
    with pytest.raises(CapacityError):
        lambda_provider.launch(request)
    assert lambda_fake.launch_attempts == 0


def test_bad_key_creates_nothing(lambda_fake: LambdaFake) -> None:
    provider = LambdaProvider("nope", base_url=f"{lambda_fake.url}/api/v1")
    with pytest.raises(AuthError, match="global/invalid-api-key"):
        provider.launch(_request()[0])
    assert lambda_fake.instances == {} and lambda_fake.ssh_keys == {}


def test_missing_key_names_the_env_vars(lambda_fake: LambdaFake) -> None:
    with pytest.raises(AuthError, match="LORABURST_LAMBDA_API_KEY or LAMBDA_API_KEY"):
        LambdaProvider(base_url=f"{lambda_fake.url}/api/v1").offers()
    assert lambda_fake.requests == 0


def test_basic_auth_and_error_envelope(lambda_fake: LambdaFake) -> None:
    base = f"{lambda_fake.url}/api/v1"
    assert httpx.get(f"{base}/instances", auth=(lambda_fake.api_key, "")).json() == {"data": []}
    r = httpx.get(f"{base}/instances/nope", auth=(lambda_fake.api_key, ""))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "global/object-does-not-exist"
    bad = httpx.post(
        f"{base}/instance-operations/launch",
        auth=(lambda_fake.api_key, ""),
        json={
            "region_name": "us-east-1",
            "instance_type_name": "gpu_1x_a10",
            "ssh_key_names": [],
            "quantity": 2,
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "global/invalid-parameters"


def test_lost_launch_reply_finds_the_instance(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    lambda_fake.faults.lose_create = 1
    machine = lambda_provider.launch(_request("lb-lost-1")[0])
    assert list(lambda_fake.instances) == [machine.id]


def test_terminate_unknown_and_twice_is_success(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    lambda_provider.terminate("0" * 32)
    machine = lambda_provider.launch(_request()[0])
    lambda_provider.terminate(machine.id)
    lambda_provider.terminate(machine.id)
    assert lambda_fake.running() == []


def test_terminate_failure_surfaces(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    machine = lambda_provider.launch(_request()[0])
    lambda_fake.faults.terminate_fails = 10
    with pytest.raises(ProviderAPIError, match="internal-error"):
        lambda_provider.terminate(machine.id)
    assert lambda_fake.running() == [machine.id]


def test_preempted_instance_reports_preempted(
    lambda_fake: LambdaFake, lambda_provider: LambdaProvider
) -> None:
    machine = lambda_provider.launch(_request()[0])
    lambda_fake.preempt(machine.id)
    current = lambda_provider.get(machine.id)
    assert current is not None and current.status == "preempted"
    lambda_provider.terminate(machine.id)
    assert lambda_provider.get(machine.id) is None
