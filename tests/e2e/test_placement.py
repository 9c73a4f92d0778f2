"""Money-aware placement against the RunPod and Lambda emulators (billing clocks running):
chain order, cheapest feasible offer, capacity failover, the local GPU, budgets refused before
any create and budgets enforced at runtime, and the cache that rents nothing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from loraburst import BudgetExceededError, ConfigError, Job, PlacementError
from loraburst._cost.placement import plan
from loraburst._state.ledger import Ledger
from loraburst.providers import Capabilities, Host, LaunchRequest, Machine, Offer
from loraburst.providers.local import LocalProvider

from tests.conftest import SAMPLE_DATA, sample_job

# Rows long enough that the GPU's speed, not per-step overhead, sets the time (plan level only).
LONG_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "word " * 800},
            {"role": "assistant", "content": "answer " * 800},
        ]
    }
    for _ in range(32)
]


def _long_job(steps: int, **kwargs: Any) -> Job:
    return Job(
        "meta-llama/Llama-3.1-8B",
        LONG_ROWS,
        train={"max_steps": steps, "max_seq_len": 2048},
        **kwargs,
    )


def _cheapest_in_stock(runpod_fake: Any) -> tuple[str, float]:
    """(gpuTypeId, price) of the cheapest GPU the RunPod emulator has in stock."""
    gid, _, _, price, _ = min((g for g in runpod_fake.gpu_types if g[4]), key=lambda g: g[3])
    return gid, price


def _cheapest_with_capacity(lambda_fake: Any) -> str:
    """The cheapest single-GPU instance type the Lambda emulator has capacity for."""
    return str(
        min((t for t in lambda_fake.instance_types if t[4] and t[3] == 1), key=lambda t: t[2])[0]
    )


# -- the local GPU, at the plan level (this machine has none) ------------------------------------
class GpuBox:
    """A local provider as it looks on a machine with one RTX 4090: a $0 offer that the
    estimator prices like any GPU. Only ``offers`` is exercised; nothing is launched."""

    name: ClassVar[str] = "local"
    capabilities: Capabilities = LocalProvider.capabilities
    unsupported: ClassVar[Mapping[str, str]] = {"spot": "a local machine cannot be preempted"}

    def __init__(self, gpu: str = "RTX 4090", vram_gb: float = 24.0) -> None:
        self.gpu, self.vram_gb = gpu, vram_gb

    def offers(self) -> list[Offer]:
        return [Offer("local", self.gpu, 1, self.vram_gb, 0.0, self.gpu, price_source="local")]

    def launch(self, request: LaunchRequest) -> Machine:
        raise NotImplementedError("plan-level only")

    def get(self, machine_id: str) -> Machine | None:
        return None

    def find(self, tag: str) -> Machine | None:
        return None

    def list_tagged(self, prefix: str = "lb-") -> list[Machine]:
        return []

    def terminate(self, machine_id: str) -> None:
        return None

    def connect(self, machine: Machine, key_path: Path | None, workdir: str) -> Host:
        raise NotImplementedError("plan-level only")

    def self_termination(self, machine: Machine) -> None:
        return None


def _where(cands: list[Any]) -> list[tuple[str, str]]:
    return [(c.offer.provider, c.offer.gpu) for c in cands]


def test_plan_ranks_feasible_offers_and_places_the_local_gpu(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    job = sample_job(tiny_model, tmp_path, "plan")
    box = GpuBox()
    # "auto" ranks every offer by cost: the local 4090 is free, so it comes first; then RunPod's
    # GPUs from the cheapest; the local CPU (no estimate) is not part of this chain.
    auto = plan(job, [runpod_provider, box, "auto"])
    assert auto[0].offer.provider == "local" and auto[0].row is not None
    prices = [c.offer.price_per_hour for c in auto[1:]]
    assert prices == sorted(prices) and auto[1].offer.gpu == "RTX 3090"
    # An explicit chain keeps its order: the local GPU is where the user put it.
    chained = plan(job, [runpod_provider, box])
    assert chained[-1].offer.provider == "local"
    assert [c.offer.provider for c in chained[:-1]] == ["runpod"] * (len(chained) - 1)
    # A job that does not fit 24 GB skips the local card and one 24 GB cloud card; several
    # 24 GB cards of one pod can hold it (FSDP), and are ranked by cost with the rest.
    big = Job("meta-llama/Llama-3.1-70B", SAMPLE_DATA, train={"max_steps": 100})
    cands = plan(big, [runpod_provider, box, "auto"])
    assert all(c.offer.vram_gb > 24 or c.offer.gpu_count > 1 for c in cands)
    assert "local" not in {c.offer.provider for c in cands}
    costs = [c.row.cost_usd for c in cands if c.row]
    assert costs == sorted(costs)
    # On RTX 3090s only, the cheapest feasible offer is a pod of several, sharded.
    on_3090 = plan(big, runpod_provider, gpu="RTX 3090")
    assert on_3090 and all(c.offer.gpu_count > 1 for c in on_3090)
    first = on_3090[0]
    assert first.row is not None and first.row.strategy.startswith("fsdp")
    assert first.offer.price_per_hour == pytest.approx(0.43 * first.offer.gpu_count)
    two = plan(big, runpod_provider, gpu="2x RTX 3090")
    assert [(c.offer.gpu, c.offer.gpu_count) for c in two] == [("RTX 3090", 2)]
    assert two[0].row is not None and two[0].row.strategy == "fsdp+offload"
    assert two[0].row.host_ram_gb > 35
    # With a deadline the local card cannot meet, it is the last resort instead of the first.
    long = _long_job(5000)
    rows = {
        (c.offer.provider, c.offer.gpu): c.row for c in plan(long, [runpod_provider, box, "auto"])
    }
    local, h100 = rows["local", "RTX 4090"], rows["runpod", "H100 SXM"]
    assert local is not None and h100 is not None
    local_s, h100_s = local.total_s, h100.total_s
    assert h100_s < local_s
    deadline = (h100_s + local_s) / 2
    late = plan(long, [runpod_provider, box, "auto"], deadline=deadline)
    assert late[-1].offer.provider == "local" and late[0].offer.provider == "runpod"
    assert all(c.row and c.row.total_s <= deadline for c in late[:-1])
    # prefer="fastest" puts the fastest GPU first; "cheapest" a cheaper, slower one.
    fastest = plan(long, runpod_provider, prefer="fastest")
    cheapest = plan(long, runpod_provider)
    assert fastest[0].row and cheapest[0].row
    assert fastest[0].row.total_s == min(c.row.total_s for c in fastest if c.row)
    assert cheapest[0].row.cost_usd == min(c.row.cost_usd for c in cheapest if c.row)
    assert fastest[0].offer.gpu != cheapest[0].offer.gpu
    assert fastest[0].row.total_s < cheapest[0].row.total_s
    # gpu= as a minimum VRAM, or names in any spelling the catalog knows.
    assert {c.offer.vram_gb >= 48 for c in plan(job, runpod_provider, gpu=48)} == {True}
    assert _where(plan(job, runpod_provider, gpu=["1x 4090", "1x nvidia h100 80gb hbm3"])) == [
        ("runpod", "RTX 4090"),
        ("runpod", "H100 SXM"),
    ]
    # Preference tuning trains on one GPU: a count above one is refused before renting.
    dpo = Job(str(tiny_model), SAMPLE_DATA, objective={"type": "dpo"})
    with pytest.raises(ConfigError, match="dpo .* trains on one GPU"):
        plan(dpo, runpod_provider, gpu="2x RTX 4090")


def test_local_cpu_is_the_last_resort(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    job = sample_job(tiny_model, tmp_path, "cpu")
    cands = plan(job, [runpod_provider, "local"])
    assert cands[-1].offer.gpu == "cpu" and cands[-1].row is None
    assert plan(job, ["local", runpod_provider])[-1].offer.gpu == "cpu"  # no estimate: last
    # When every cloud offer is filtered out, the CPU is what is left.
    assert _where(plan(job, [runpod_provider, "local"], max_price_per_hour=0.01)) == [
        ("local", "cpu")
    ]
    # Naming a GPU rules the CPU out.
    assert all(c.offer.gpu != "cpu" for c in plan(job, [runpod_provider, "local"], gpu="4090"))


def test_over_budget_is_refused_before_any_create(
    tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    job = _long_job(5000, output_dir=tmp_path / "out", name="broke")
    h100 = plan(job, runpod_provider, gpu="H100 SXM")[0].row
    lowest = min(
        (c.row for c in plan(job, runpod_provider) if c.row), key=lambda r: r.cost_high_usd
    )
    assert h100 is not None and lowest.cost_high_usd < h100.cost_usd
    cap = round((lowest.cost_high_usd + h100.cost_usd) / 2, 2)  # fits cheaper GPUs, not the H100
    with pytest.raises(BudgetExceededError) as info:
        job.run(provider=runpod_provider, gpu="H100 SXM", max_cost=cap, progress=False)
    msg = str(info.value)
    assert runpod_fake.pods == {} and Ledger().jobs() == []
    assert f"${h100.cost_usd:.2f}" in msg and f"${h100.cost_high_usd:.2f}" in msg
    assert f"a cheaper GPU: runpod {lowest.gpu} (up to ${lowest.cost_high_usd:.2f})" in msg
    steps = int(msg.split("train.max_steps: ")[1].split()[0])
    assert 0 < steps < 5000
    # The suggestion is honest: that many steps on the H100 fit the cap, and a few more do not.
    assert plan(_long_job(steps), runpod_provider, gpu="H100 SXM", max_cost=cap)
    with pytest.raises(BudgetExceededError):
        plan(_long_job(int(steps * 1.1) + 5), runpod_provider, gpu="H100 SXM", max_cost=cap)


# -- end to end on the emulators ----------------------------------------------------------------
def test_chain_order_cheapest_feasible_and_cache(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    lambda_fake: Any,
    lambda_provider: Any,
) -> None:
    # Lambda's cheapest type has no capacity: the cheapest *feasible* one is the next.
    lambda_fake.set_capacity("gpu_1x_a10", [])
    expected = _cheapest_with_capacity(lambda_fake)
    assert _cheapest_in_stock(runpod_fake)[1] < 1.29  # RunPod is cheaper, yet Lambda is first
    job = sample_job(tiny_model, tmp_path / "out", "chain")
    result = job.run(provider=[lambda_provider, runpod_provider], progress=False)
    assert result.status == "succeeded" and result.provider == "lambda"
    (inst,) = lambda_fake.instances.values()
    assert inst.data["type"][0] == expected
    assert runpod_fake.pods == {} and lambda_fake.running() == []
    assert [a.outcome for a in result.attempts] == ["ok"]
    # The same job again: the cached adapter at $0, nothing rented anywhere.
    again = sample_job(tiny_model, tmp_path / "out2", "chain").run(
        provider=[lambda_provider, runpod_provider], progress=False
    )
    assert again.status == "cached" and again.cost_usd == 0.0
    assert again.adapter_path == result.adapter_path
    assert len(lambda_fake.instances) == 1 and runpod_fake.pods == {}


def test_capacity_failover_is_recorded(
    tiny_model: Path,
    tmp_path: Path,
    runpod_fake: Any,
    runpod_provider: Any,
    lambda_fake: Any,
    lambda_provider: Any,
) -> None:
    runpod_fake.faults.capacity = True
    in_stock = [g for g in runpod_fake.gpu_types if g[4]]
    job = sample_job(tiny_model, tmp_path / "out", "failover")
    result = job.run(provider=[runpod_provider, lambda_provider], progress=False)
    assert result.status == "succeeded" and result.provider == "lambda"
    # Every in-stock RunPod offer (each GPU, in pods of 1, 2, 4 and 8) was tried, cheapest
    # first, and refused; no pod was created.
    refused = [a for a in result.attempts if a.provider == "runpod"]
    assert [a.gpu for a in refused] == [c.offer.gpu for c in plan(job, runpod_provider)]
    assert len({a.gpu for a in refused}) == len(in_stock)
    assert all(a.outcome.startswith("capacity") and a.cost_usd == 0 for a in refused)
    assert result.attempts[-1].provider == "lambda" and result.attempts[-1].outcome == "ok"
    assert runpod_fake.pods == {}
    (inst,) = lambda_fake.instances.values()
    assert inst.data["type"][0] == _cheapest_with_capacity(lambda_fake)
    assert lambda_fake.running() == []
    # When every offer fails, the error has a table of every attempt and its reason.
    with pytest.raises(PlacementError) as info:
        sample_job(tiny_model, tmp_path / "out", "nowhere").run(
            provider=runpod_provider, progress=False, cache=False
        )
    assert [a[1] for a in info.value.attempts] == [a.gpu for a in refused]
    assert all(a[0] == "runpod" and a[2].startswith("capacity") for a in info.value.attempts)
    assert all(f"runpod     {a.gpu}" in str(info.value) for a in refused)
    assert runpod_fake.pods == {}


def test_runtime_cap_stops_with_a_partial_adapter(
    tiny_model: Path, tmp_path: Path, runpod_fake: Any, runpod_provider: Any
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # A GPU priced so that the cap is reached after a few seconds of CPU training: the client
    # stops 45 s + one increment before the cap, leaving time to save, pull and terminate.
    price = 36.0  # $/h: one cent a second
    gid = next(g for g in runpod_fake.gpu_types if g[1] == "RTX 4090")
    gid[3] = price
    max_cost = round(price * 75 / 3600, 4)
    job = sample_job(tiny_model, tmp_path / "out", "capped", max_steps=5000, save_every_steps=5)
    result = job.run(
        provider=runpod_provider,
        gpu="RTX 4090",
        max_cost=max_cost,
        allow_partial=True,
        progress=False,
    )
    assert result.status == "budget_exhausted"
    assert 0 < result.metrics["steps"] < 5000
    (pod_id,) = runpod_fake.pods
    billed = runpod_fake.cost(pod_id)
    increment = price * runpod_fake.billing_increment_s / 3600
    assert 0 < billed <= max_cost + increment
    assert runpod_fake.running() == []
    assert abs(result.cost_usd - billed) <= 3 * increment  # the client tracked the bill
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, result.adapter_path)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)
