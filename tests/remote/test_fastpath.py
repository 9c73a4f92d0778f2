"""The fast path computes the same function as the stock peft + bnb model (CPU, tiny real models)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraburst.remote import fastpath, planning  # noqa: E402
from loraburst.remote.fastpath import layers, patch  # noqa: E402
from loraburst.remote.fastpath import mlp as mlp_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v carry biases
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),  # a type the planner has not measured
}


def _tiny_lora(quantised: bool, seed: int = 0, arch: str = "llama") -> Any:
    """A tiny Llama (fp32, or NF4 on bnb's CPU path) with LoRA r=8 whose B is non-zero."""
    torch.manual_seed(seed)
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    model = getattr(transformers, model_cls)(config)
    if quantised:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in PROJ:
                    lin = getattr(parent, name, None)
                    if lin is None:
                        continue
                    q = bnb.nn.Linear4bit(
                        lin.in_features, lin.out_features, bias=lin.bias is not None,
                        compute_dtype=torch.float32, quant_type="nf4",
                    )  # fmt: skip
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data.clone(), requires_grad=False, quant_type="nf4"
                    )._quantize("cpu")
                    if lin.bias is not None:
                        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
                    setattr(parent, name, q)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ)
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # B starts at zero; make the adapters matter for the test
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model: Any, x: Any) -> tuple[float, dict[str, Any]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _apply(model: Any, **kw: Any) -> Any:
    opts = dict(
        every=0, dequant_cache=False, chunked_loss=True, fused_lora=True,
        fuse_elementwise=False, compile_layers=False, offload_checkpoints=False, loss_chunk=7,
    )  # fmt: skip
    opts.update(kw)
    return patch._apply(model, fastpath.FastpathReport(), **opts)


@pytest.mark.parametrize("quantised", [False, True], ids=["bf16-free", "nf4"])
@pytest.mark.parametrize(("every", "offload"), [(0, False), (1, False), (2, False), (1, True)])
def test_patched_model_matches_peft(quantised: bool, every: int, offload: bool) -> None:
    x = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _tiny_lora(quantised)
    ours = copy.deepcopy(ref)
    ref_loss, ref_grads = _loss_and_grads(ref, x)
    cache = 2 if quantised else False
    report = _apply(
        ours, every=every, dequant_cache=cache, offload_checkpoints=offload
    ).fastpath_report
    assert report["fused_lora_linears"] == 3 * 7
    assert report["grouped_projections"] == 3 * 2  # q/k/v and gate/up in each layer
    assert report["chunked_loss"] is True
    assert report["checkpointed_layers"] == (0 if every == 0 else 3 // every)
    if quantised:
        assert report["cached_linears"] == 2 * 7
    loss, grads = _loss_and_grads(ours, x)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 7 * 2
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("quantised", [False, True], ids=["fp32", "nf4"])
def test_grouped_projections_match_peft_with_padding(arch: str, quantised: bool) -> None:
    """q/k/v and gate/up as one GEMM each, padded batches, biases (Qwen2): same loss and grads."""
    x = torch.randint(0, TINY["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[1, 14:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    labels = x.masked_fill(mask == 0, -100)
    ref = _tiny_lora(quantised, arch=arch)
    ours = copy.deepcopy(ref)
    report = _apply(ours, every=1, dequant_cache=1).fastpath_report
    assert report["grouped_projections"] == 3 * 2 and report["cached_linears"] == 7

    def run(model: Any) -> tuple[float, dict[str, Any]]:
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        return float(loss.detach()), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    (ref_loss, ref_grads), (loss, grads) = run(ref), run(ours)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 7 * 2
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_projections_rerun_the_norm_instead_of_keeping_its_output(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q/k/v and gate/up keep the norm's input (kept by the norm anyway), not its output, and
    the gradients are unchanged."""
    monkeypatch.setenv(layers.ENV_ELEMENTWISE, "eager")
    layers.elementwise_backend.cache_clear()
    layers._compiled.cache_clear()
    try:
        x = torch.randint(
            0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3)
        )
        ref = _tiny_lora(False, arch=arch)
        ours = copy.deepcopy(ref)
        ref_loss, ref_grads = _loss_and_grads(ref, x)
        assert _apply(ours, fuse_elementwise=True).fastpath_report["fused_elementwise"] > 0
        normed: list[Any] = []  # held, so no later tensor can reuse their memory
        for module in ours.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.register_forward_hook(lambda m, i, out: normed.append(out))
        saved: list[int] = []

        def pack(t: Any) -> Any:
            saved.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, grads = _loss_and_grads(ours, x)
        assert len(normed) == 2 * TINY["num_hidden_layers"] + 1
        assert not {t.untyped_storage().data_ptr() for t in normed} & set(saved)
        assert abs(loss - ref_loss) / ref_loss < 1e-5
        for name, g in grads.items():
            assert _rel(g, ref_grads[name]) < 1e-4, name
    finally:
        layers.elementwise_backend.cache_clear()
        layers._compiled.cache_clear()


def test_grouped_attention_leaves_generation_to_the_original() -> None:
    model = _tiny_lora(False)
    x = torch.randint(0, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        want = model.generate(x, max_new_tokens=5, do_sample=False)
    _apply(model)
    model.eval()
    with torch.no_grad():
        got = model.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_nf4_kernel_matches_bitsandbytes_in_triton_interpreter() -> None:
    """The one-launch NF4 dequantiser is bitsandbytes' arithmetic (Triton's CPU interpreter)."""
    pytest.importorskip("triton")
    code = """
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
import bitsandbytes.functional as F
from loraburst.remote.kernels import Nf4Weight
torch.manual_seed(0)
bad = 0
for shape, nested in [((256, 512), True), ((96, 64), False), ((1000, 128), True)]:
    w = torch.randn(shape, dtype=torch.bfloat16)
    q, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64)
    ref = F.dequantize_4bit(q, qs).to(torch.bfloat16)
    # fp32 out: the interpreter truncates on a bf16 store, CUDA rounds to nearest even
    out = torch.empty(shape, dtype=torch.float32)
    got = Nf4Weight(q, qs).dequantize(out=out).to(torch.bfloat16)
    bad += int((got != ref).sum())
print("mismatches", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mismatches 0" in out.stdout


def test_cached_weight_is_what_bnb_dequantises() -> None:
    import bitsandbytes.functional as bnbf

    model = _tiny_lora(quantised=True)
    _apply(model, dequant_cache=True)
    layer = model.base_model.model.model.layers[1]
    base = layer.self_attn.o_proj.base_layer
    w = base.weight
    assert torch.equal(base._fastpath_weight, bnbf.dequantize_4bit(w.data, w.quant_state))
    stacked = [bnbf.dequantize_4bit(p.base_layer.weight.data, p.base_layer.weight.quant_state)
               for p in (layer.mlp.gate_proj, layer.mlp.up_proj)]  # fmt: skip
    assert torch.equal(layer.mlp._fastpath_gu.cached, torch.cat(stacked))


def test_training_steps_change_every_adapter_and_track_reference() -> None:
    x = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(2))
    ref, ours = _tiny_lora(True), _tiny_lora(True)
    _apply(ours, every=1, dequant_cache=1)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    curves = []
    for model in (ref, ours):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        curves.append(losses)
    assert curves[1][-1] < curves[1][0]
    assert abs(curves[1][-1] - curves[0][-1]) / curves[0][-1] < 1e-3
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not train"


def test_stacked_adapters_follow_every_kind_of_parameter_update() -> None:
    """The bf16 stack of a group's adapters is kept between passes; any change to a parameter
    (a fused optimizer's in-place step, an in-place edit, a ``.data`` swap) rebuilds it."""
    x = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    ref, ours = _tiny_lora(False), _tiny_lora(False)
    _apply(ours)
    pairs = [(a, b) for a, b in zip(ref.parameters(), ours.parameters(), strict=True)
             if b.requires_grad]  # fmt: skip
    for step in range(3):
        for model, params in ((ref, [a for a, _ in pairs]), (ours, [b for _, b in pairs])):
            model(input_ids=x, labels=x).loss.backward()
            if step == 0:
                torch.optim.AdamW(params, lr=1e-2, fused=True).step()
            elif step == 1:
                with torch.no_grad():
                    for p in params:
                        p.mul_(1.5)
            else:
                for p in params:
                    p.data = p.data.clone() - 0.01
            model.zero_grad()
        want, got = ref(input_ids=x).logits, ours(input_ids=x).logits
        assert _rel(got, want) < 1e-5, f"stale adapters after update {step}"


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
def test_linear_cross_entropy_matches_full_logits(chunk: int | None) -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (3, 11), generator=gen)
    labels[0, 4:7] = -100
    from transformers.loss.loss_utils import ForCausalLMLoss  # what HF's forward uses

    hf_loss = ForCausalLMLoss(logits=hidden @ weight.t(), labels=labels, vocab_size=97)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    ref_loss = torch.nn.functional.cross_entropy(  # the same in float64
        (hidden @ weight.t()).reshape(-1, 97), shifted.reshape(-1), ignore_index=-100
    )
    ref_gh, ref_gw = torch.autograd.grad(ref_loss, (hidden, weight))
    loss = fastpath.linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    gh, gw = torch.autograd.grad(loss * 1.0, (hidden, weight))
    assert _rel(loss, hf_loss) < 1e-6  # HF upcasts to fp32 only
    assert _rel(loss, ref_loss) < 1e-12
    assert _rel(gh, ref_gh) < 1e-12 and _rel(gw, ref_gw) < 1e-12
    summed = fastpath.linear_cross_entropy(hidden, weight, labels, num_items=7, chunk=chunk)
    n = int((shifted != -100).sum())
    assert _rel(summed, ref_loss * n / 7) < 1e-12


def test_rms_norm_matches_hugging_face() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    assert torch.equal(layers._rms_norm(x, norm.weight, 1e-5), norm(x))


def test_optimize_leaves_a_cpu_model_alone() -> None:
    model = _tiny_lora(quantised=False)
    forwards = [m.forward for m in model.modules()]
    out = fastpath.optimize(model, seq_len=32, micro_batch_size=2, gradient_checkpointing=False)
    assert out is model
    assert out.fastpath_report["applied"] is False
    assert "CUDA-only" in out.fastpath_report["reason"]
    assert [m.forward for m in model.modules()] == forwards


def test_optimize_rejects_negative_checkpoint_interval() -> None:
    with pytest.raises(ValueError, match="gradient_checkpointing=-1"):
        fastpath.optimize(
            _tiny_lora(False), seq_len=8, micro_batch_size=1, gradient_checkpointing=-1
        )


def test_fastpath_imports_only_the_standard_library() -> None:
    code = "import sys, loraburst.remote.fastpath; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    mods = set(json.loads(out.stdout))
    assert not {"torch", "transformers", "peft", "bitsandbytes"} & mods


def test_plan_recomputes_the_fewest_layers_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_lora(False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    shape = {"seq_len": 65536, "micro_batch_size": 16}  # ~1.6 GB of activations per layer
    # What probe_memory measures on a GPU, given here: bytes kept by the forward and at the
    # step's peak, as c0 + c1 tokens + c2 tokens^2 (3 layers at ~2 KB a token each).
    probe = {"ok": True, "kept_fit": (0.0, 6000.0, 0.0), "peak_fit": (2**20, 6400.0, 0.0),
             "cache_bytes": 2**20, "chunked_loss": True}  # fmt: skip
    plans = [
        fastpath.plan(model, **shape, budget_gib=b, headroom_gib=0.5, probe=probe)
        for b in (40, 9, 6, 4, 1)
    ]
    assert [p["recompute_layers"] for p in plans] == sorted(p["recompute_layers"] for p in plans)
    roomy, *_, hopeless = plans
    assert roomy["fits"] and roomy["recompute_layers"] == 0 and roomy["dequant_cache"] == 3
    assert roomy["loss_chunk"] is None  # the big default chunk where memory allows
    assert 0 < plans[2]["recompute_layers"] < 3 and plans[2]["loss_chunk"] == 1024
    for p, budget in zip(plans[:3], (40, 9, 6), strict=True):
        assert p["fits"] and p["predicted_peak_gib"] <= budget - 0.5
    assert not hopeless["fits"] and hopeless["recompute_layers"] == 3
    # The least memory when nothing fits (a smaller chunk saves nothing here: the backward's
    # transient outweighs this small vocabulary's logits, so the larger chunk is kept).
    assert hopeless["loss_chunk"] == 1024


def test_recompute_layers_spreads_an_exact_count() -> None:
    x = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(6))
    ref = _tiny_lora(True)
    ours = copy.deepcopy(ref)
    report = _apply(ours, recompute_layers=2, offload_checkpoints=True).fastpath_report
    layers = ours.base_model.model.model.layers
    assert report["checkpointed_layers"] == 2
    assert [layer.gradient_checkpointing for layer in layers].count(True) == 2
    (ref_loss, ref_grads), (loss, grads) = _loss_and_grads(ref, x), _loss_and_grads(ours, x)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) < 1e-4, name
    with pytest.raises(ValueError, match="recompute_layers=4"):
        _apply(copy.deepcopy(ref), recompute_layers=4)


def test_chunked_loss_applies_final_logit_softcapping() -> None:
    """Gemma-2's soft-capped logits: same loss and gradients as capping the full logits."""
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen) * 3  # large logits, where the cap bites
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    labels[0, :3] = -100
    cap = 5.0
    logits = cap * torch.tanh(hidden @ weight.t() / cap)
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = fastpath.linear_cross_entropy(hidden, weight, labels, chunk=4, softcap=cap)
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert torch.allclose(got, want, rtol=1e-5)
    assert _rel(got_grad, want_grad) < 1e-5


@pytest.mark.parametrize("offload", [False, True])
def test_apply_plan_sets_recompute_cache_and_chunk_without_changing_the_function(
    offload: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offloaded, each MLP runs in chunks of 10 tokens (48 here: 5 chunks, the last short),
    # forward and backward: same loss and gradients.
    monkeypatch.setattr(patch, "LEAN_MLP_CHUNK", 10)
    x = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _tiny_lora(True)
    ours = copy.deepcopy(ref)
    ref_loss, ref_grads = _loss_and_grads(ref, x)
    _apply(ours, every=0, dequant_cache=False)
    report = fastpath.apply_plan(
        ours,
        {"recompute_layers": 2, "offload": offload, "dequant_cache": 1, "loss_chunk": 5},
    )
    assert report["checkpointed_layers"] == 2 and report["cached_linears"] == 7
    assert report["chunked_mlps"] == (3 if offload else 0)
    calls: list[int] = []
    linear = mlp_module.lora_product
    monkeypatch.setattr(
        mlp_module, "lora_product", lambda x, *rest: calls.append(x.shape[0]) or linear(x, *rest)
    )
    assert ours.get_base_model()._fastpath_loss_chunk == 5
    loss, grads = _loss_and_grads(ours, x)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) < 1e-4, name
    if offload:  # the chunks really ran, in the forward and in the backward
        assert calls and set(calls) == {10, 8} and len(calls) % 5 == 0
    else:
        assert not calls


def test_plan_without_a_measurement_falls_back_to_the_leanest_setting() -> None:
    """Off CUDA (or for a layer it cannot call) the probe fails: never a guess that can OOM."""
    model = _tiny_lora(False)
    chosen = fastpath.plan(model, seq_len=16, micro_batch_size=1, budget_gib=1000.0)
    assert chosen["probe"]["ok"] is False
    assert chosen["recompute_layers"] == 3 and chosen["offload"] is True
    assert chosen["dequant_cache"] == 0 and chosen["loss_chunk"] == planning.LEAN_LOSS_CHUNK


def test_plan_layers_prefers_fewer_recomputes_then_cache() -> None:
    gib = fastpath.GIB
    roomy = planning._plan_layers(100 * gib, 10 * gib, 32, 1 * gib, 0.1 * gib, 0.5 * gib, "auto")
    assert roomy["recompute_layers"] == 0 and roomy["dequant_cache"] == 32 and roomy["fits"]
    tight = planning._plan_layers(20 * gib, 10 * gib, 32, 1 * gib, 0.1 * gib, 0.5 * gib, "auto")
    assert 0 < tight["recompute_layers"] < 32 and tight["fits"]
    none = planning._plan_layers(1 * gib, 10 * gib, 32, 1 * gib, 0.1 * gib, 0.5 * gib, "auto")
    assert none["offload"] and not none["fits"]
    forced = planning._plan_layers(100 * gib, 10 * gib, 32, 1 * gib, 0.1 * gib, 0.5 * gib, "all")
    assert forced["recompute_layers"] == 32 and forced["dequant_cache"] == 32


def test_unverified_architectures_are_planned_with_a_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model type whose predictions were not checked on a GPU gets the budget / margin."""
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    probe = {"ok": True, "kept_fit": (0.0, 6000.0, 0.0), "peak_fit": (2**20, 6400.0, 0.0),
             "cache_bytes": 2**20, "chunked_loss": True}  # fmt: skip
    shape = {"seq_len": 65536, "micro_batch_size": 16, "budget_gib": 9.0, "headroom_gib": 0.5}
    llama = fastpath.plan(_tiny_lora(False), probe=probe, **shape)
    other = fastpath.plan(_tiny_lora(False, arch="gemma"), probe=probe, **shape)
    assert llama["verified_architecture"] and not other["verified_architecture"]
    assert llama["recompute_layers"] == 0 and other["recompute_layers"] > 0
    assert other["predicted_peak_gib"] <= (9.0 - 0.5) / fastpath.UNVERIFIED_MARGIN + 0.5


def test_elementwise_kernels_are_triton_on_a_gpu_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loraburst.remote.fastpath import triton_ops

    def backend(cuda: bool, triton: bool, env: str | None) -> str:
        layers.elementwise_backend.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(triton_ops, "_triton_importable", lambda: triton)
        if env is None:
            monkeypatch.delenv(layers.ENV_ELEMENTWISE, raising=False)
        else:
            monkeypatch.setenv(layers.ENV_ELEMENTWISE, env)
        try:
            return layers.elementwise_backend()
        finally:
            layers.elementwise_backend.cache_clear()

    assert backend(cuda=True, triton=True, env=None) == "triton"
    assert backend(cuda=True, triton=True, env="compile") == "compile"
    assert backend(cuda=True, triton=True, env="eager") == "eager"
    assert backend(cuda=True, triton=False, env=None) == "compile"  # no Triton on the machine
    assert backend(cuda=False, triton=True, env=None) == "compile"  # the fast path is CUDA's
