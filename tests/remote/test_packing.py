"""Packing and padding-free batches change how rows are laid out, never what each row learns.

CPU, tiny real models: every row's loss and the LoRA gradients are the same when the row is
trained alone, packed with others into one flat row (our varlen attention, stock and fast-path
forwards), or packed into padded rows (transformers' own block-diagonal mask).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraburst.remote import attention, fastpath  # noqa: E402
from loraburst.remote.batching import (  # noqa: E402
    choose_packing,
    epoch_batches,
    pack_rows,
    plan_batches,
)
from loraburst.remote.collate import collate  # noqa: E402

from tests.remote.test_fastpath import ARCHS, TINY, _apply, _rel  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(3, 17)
        ids = [rng.randrange(1, TINY["vocab_size"]) for _ in range(length)]
        prompt = rng.randint(0, length - 2)  # an assistant-style mask: loss after the prompt
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _model(arch: str = "llama", seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    model = getattr(transformers, model_cls)(config)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    return model


def _summed_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Sum of per-token losses (the mean times the counted tokens), for every layout alike."""
    inputs = {k: v for k, v in batch.items() if k not in ("num_tokens", "num_loss_tokens")}
    out = model(**inputs, num_items_in_batch=torch.tensor(1))
    return out.loss


def _per_row_reference(model: Any, rows: list[dict[str, list[int]]]) -> tuple[Any, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    total = 0
    for row in rows:
        x = torch.tensor([row["input_ids"]])
        y = torch.tensor([row["labels"]])
        loss = model(input_ids=x, labels=y, num_items_in_batch=torch.tensor(1)).loss
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def _check(model: Any, batch: dict[str, Any], ref: tuple[float, dict[str, Any]]) -> None:
    model.zero_grad(set_to_none=True)
    loss = _summed_loss(model, batch)
    loss.backward()
    ref_loss, ref_grads = ref
    assert abs(float(loss.detach()) - ref_loss) / ref_loss < 1e-5
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        rel = float((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-30))
        assert rel < 1e-4, name


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("path", ["stock", "fastpath"])
def test_flat_packed_batch_equals_rows_alone(arch: str, path: str) -> None:
    rows = _rows(7)
    model = _model(arch)
    ref = _per_row_reference(copy.deepcopy(model), rows)
    model.get_base_model().config._attn_implementation = attention.register()
    if path == "fastpath":
        report = _apply(model).fastpath_report
        assert report["grouped_projections"] == 3 * 2 and report["chunked_loss"]
    units = [[rows[i] for i in unit] for unit in pack_rows([len(r["input_ids"]) for r in rows], 32)]
    batch = collate(units, layout="flat", pad_id=0, pad_multiple=16)
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] % 16 == 0
    assert batch["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
    _check(model, batch, ref)


def test_padded_packed_batch_equals_rows_alone() -> None:
    """The padded layout (models without varlen attention): transformers' packed-sequence mask."""
    rows = _rows(7, seed=3)
    model = _model()
    model.get_base_model().config._attn_implementation = "sdpa"
    ref = _per_row_reference(copy.deepcopy(model), rows)
    units = [[rows[i] for i in unit] for unit in pack_rows([len(r["input_ids"]) for r in rows], 32)]
    batch = collate(units, layout="padded", pad_id=0, pad_multiple=8)
    assert batch["input_ids"].shape[0] == len(units) > 1
    _check(model, batch, ref)


def test_sliding_window_is_kept_on_the_reference_path() -> None:
    q = torch.randn(1, 4, 12, 8)
    k = torch.randn(1, 2, 12, 8)
    v = torch.randn(1, 2, 12, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)

    class M(torch.nn.Module):
        training = True

    out, _ = attention.varlen_attention(
        M(), q, k, v, None, scaling=0.3, sliding_window=3, cu_seq_lens_q=cu, max_length_q=7
    )
    # Row 2's last token sees only its last three positions (window 3), within its own row.
    kk = k[0, :, 9:12].repeat_interleave(2, dim=0)
    vv = v[0, :, 9:12].repeat_interleave(2, dim=0)
    want = torch.softmax(q[0, :, 11:12] @ kk.transpose(1, 2) * 0.3, dim=-1) @ vv
    assert torch.allclose(out[0, 11], want[:, 0], atol=1e-6)


def test_softcapped_models_are_refused_by_varlen_attention() -> None:
    config = transformers.Gemma2Config(**{**TINY, "model_type": "gemma2"})
    ok, why = attention.supports(config)
    assert not ok and "soft-capping" in why


def test_softcapped_attention_trains_through_eager_attention() -> None:
    """Gemma-2 loads with SDPA, which drops the attention soft-cap without a word: the trainer
    (and evaluation) switch it to eager attention, which computes the model's own function."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**{**TINY, "model_type": "gemma2",
                                          "attn_logit_softcapping": 0.5})  # fmt: skip
    model = transformers.Gemma2ForCausalLM(config).train()
    with torch.no_grad():  # large scores, so that the cap bites
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))

    def hidden(impl: str) -> Any:
        model.config._attn_implementation = impl
        return model.model(input_ids=ids).last_hidden_state

    assert model.config._attn_implementation == "sdpa"  # as loaded: the cap is not computed
    dropped, capped = hidden("sdpa"), hidden("eager")
    assert _rel(dropped, capped) > 1e-3  # the same function would agree to ~1e-6 in fp32
    impl = attention.train_implementation(model.config, "padded")
    assert impl == "eager" and attention.stock_implementation(model.config) == "eager"
    assert torch.equal(hidden(impl), capped)
    llama = transformers.LlamaConfig(**TINY)
    assert attention.train_implementation(llama, "padded") is None
    assert attention.train_implementation(llama, "flat") == attention.NAME
    assert attention.stock_implementation(llama) == "sdpa"


# ------------------------------------------------------------------------------- batching


def test_pack_rows_fills_sequences_and_keeps_every_row_once() -> None:
    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(5.9, 0.8)) + 1) for _ in range(3000)]
    bins = pack_rows(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    # Best-fit decreasing on log-normal rows leaves almost nothing empty.
    assert sum(lengths) / (len(bins) * 2048) > 0.98


def test_plan_is_deterministic_per_epoch_and_differs_between_epochs() -> None:
    lengths = [random.Random(i).randint(5, 300) for i in range(200)]
    plan = plan_batches(lengths, max_seq_len=512, micro_batch=4, packing=False, seed=7, epochs=2)
    e0 = epoch_batches(plan, lengths, seed=7, epoch=0, padded=False)
    assert e0 == epoch_batches(plan, lengths, seed=7, epoch=0, padded=False)
    assert e0 != epoch_batches(plan, lengths, seed=7, epoch=1, padded=False)
    assert sorted(u for b in e0 for u in b) == list(range(200))
    assert plan.max_tokens >= max(sum(lengths[u] for u in b) for b in e0)


def test_padded_unpacked_batches_group_rows_by_length() -> None:
    rng = random.Random(1)
    lengths = [rng.choice([10, 1000]) for _ in range(512)]
    grouped = plan_batches(
        lengths, max_seq_len=1024, micro_batch=8, packing=False, seed=0, padded=True
    )
    mixed = plan_batches(lengths, max_seq_len=1024, micro_batch=8, packing=False, seed=0)
    # Length grouping puts short rows together: far less padding than a random order.
    batches = epoch_batches(grouped, lengths, seed=0, epoch=0, padded=True)
    padded = sum(max(lengths[u] for u in b) * len(b) for b in batches)
    shuffled = epoch_batches(mixed, lengths, seed=0, epoch=0, padded=False)
    padded_random = sum(max(lengths[u] for u in b) * len(b) for b in shuffled)
    assert padded < 0.7 * padded_random


def test_packing_auto_packs_short_rows_only() -> None:
    assert choose_packing("auto", [100] * 50, 2048) is True
    assert choose_packing("auto", [1500] * 50, 2048) is False
    assert choose_packing(False, [100] * 50, 2048) is False
    with pytest.raises(ValueError, match="packing"):
        choose_packing("sometimes", [1], 8)


def test_fast_path_plan_counts_tokens_not_rows() -> None:
    """The planner sizes activations by the tokens a micro-batch really holds."""
    model = _model()
    probe = {"ok": True, "kept_fit": (0.0, 1e6, 0.0), "peak_fit": (0.0, 1.1e6, 0.0),
             "cache_bytes": 0, "chunked_loss": True}  # fmt: skip
    kw = {"seq_len": 2048, "micro_batch_size": 1, "budget_gib": 1000, "probe": probe}
    small = fastpath.plan(model, tokens=64, layout="flat", **kw)
    big = fastpath.plan(model, tokens=4096, layout="flat", **kw)
    assert big["predicted_peak_gib"] - small["predicted_peak_gib"] > 3.5  # ~1 MB a token
