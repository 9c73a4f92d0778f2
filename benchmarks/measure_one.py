"""Measure ONE trainer config in this process and print one JSON line (last line of stdout).

    python benchmarks/measure_one.py --stack ours|vanilla|unsloth --model llama-3-8b \\
        --seq 2048 --micro-batch 4 [--grad-ckpt on|off|auto|K] [--lora-r 16] \\
        [--steps 12 --warmup 3] [--mem-cap-gib 24] [--loss-steps 0] [--out FILE.json]

Prints ``{"stack", "model", "seq", "micro_batch", "grad_ckpt", "lora_r", "tokens_per_s",
"step_s_median", "peak_alloc_gib", "peak_reserved_gib", "mfu", "losses", "ok", ...}`` or
``"ok": false`` with ``"error"``. Random-weight model of the real shape (see ``common.py``), NF4
with double quantisation, LoRA r on all seven projections, bf16, random tokens from a fixed seed,
``model.train()``, median step time of ``--steps`` after ``--warmup``. Peak memory is counted from
the first training step (the checkpoint load is not). ``--loss-steps N`` first trains N steps on
the learnable parity data (``common.parity_batches``) and reports those losses.

``ours`` options (ignored by the other stacks): ``--grad-ckpt K`` recomputes every K-th layer,
``auto`` lets ``fastpath.plan`` pick it and the dequant cache under the memory budget;
``--cache none|all|auto|N`` (default none); ``--no-chunked-loss``, ``--no-fused-lora``,
``--no-fuse-elementwise``, ``--no-group``, ``--compile-layers``, ``--offload`` (checkpoints in host memory).
``--profile N`` (any stack) then traces N more steps: GPU time by kernel kind and the top kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stack", choices=["ours", "vanilla", "unsloth"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-ckpt", default="on", help="on | off | auto | K (ours: every K-th)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mem-cap-gib", type=float, default=None)
    ap.add_argument("--loss-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate (loss-parity run)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", default="none", help="ours: none | all | auto | N layers")
    ap.add_argument("--no-chunked-loss", action="store_true")
    ap.add_argument("--no-fused-lora", action="store_true")
    ap.add_argument("--no-fuse-elementwise", action="store_true")
    ap.add_argument("--no-group", action="store_true", help="ours: q/k/v, gate/up apart")
    ap.add_argument("--compile-layers", action="store_true")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--loss-chunk", type=int, default=None, help="ours: tokens per loss chunk")
    ap.add_argument("--tag", default="", help="free text copied into the result")
    ap.add_argument("--profile", type=int, default=0, help="then profile N more steps")
    return ap.parse_args(argv)


def _ours(args: argparse.Namespace, path: Path) -> tuple[Any, dict[str, Any]]:
    import common
    import torch

    from remote import fastpath

    torch.manual_seed(args.seed)
    model = common.load_ours(path, lora_r=args.lora_r)
    ckpt: bool | int
    cache: bool | int
    planned: dict[str, Any] = {}
    if args.grad_ckpt == "auto" or args.cache == "auto":
        total = torch.cuda.get_device_properties(0).total_memory / common.GIB
        budget = args.mem_cap_gib if args.mem_cap_gib else total
        planned = fastpath.plan(
            model, seq_len=args.seq, micro_batch_size=args.micro_batch, budget_gib=budget
        )
    recompute = None
    if args.grad_ckpt == "auto":
        ckpt, recompute = bool(planned["gradient_checkpointing"]), planned["recompute_layers"]
    else:
        ckpt = (
            {"on": True, "off": False}[args.grad_ckpt]
            if args.grad_ckpt in ("on", "off")
            else int(args.grad_ckpt)
        )
    if args.cache == "auto":
        cache = planned["dequant_cache"]
    else:
        cache = (
            {"none": False, "all": True}[args.cache]
            if args.cache in ("none", "all")
            else int(args.cache)
        )
    model = fastpath.optimize(
        model, seq_len=args.seq, micro_batch_size=args.micro_batch, gradient_checkpointing=ckpt,
        dequant_cache=cache, chunked_loss=not args.no_chunked_loss,
        fused_lora=not args.no_fused_lora, fuse_elementwise=not args.no_fuse_elementwise,
        compile_layers=args.compile_layers, offload_checkpoints=args.offload,
        loss_chunk=args.loss_chunk or planned.get("loss_chunk"), recompute_layers=recompute,
        group_projections=not args.no_group,
    )  # fmt: skip
    return model, {"fastpath": dict(model.fastpath_report), "plan": planned}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Load, train, time; return the result dict (raises on failure)."""
    import common
    import torch

    if args.mem_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * common.GIB / total))
    path = common.ensure_checkpoint(args.model)
    t_load = time.perf_counter()
    on = args.grad_ckpt != "off"
    extra: dict[str, Any] = {}
    if args.stack == "ours":
        model, extra = _ours(args, path)
    elif args.stack == "vanilla":
        torch.manual_seed(args.seed)
        model = common.load_vanilla(path, lora_r=args.lora_r, grad_ckpt=on)
    else:
        model = common.load_unsloth(path, seq=args.seq, lora_r=args.lora_r, grad_ckpt=on)
    extra["load_s"] = round(time.perf_counter() - t_load, 1)
    model.train()
    vocab = common.MODELS[args.model]["vocab_size"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses: list[float] = []
    if args.loss_steps:
        batches = common.parity_batches(args.micro_batch, args.seq, args.loss_steps, args.seed)
        losses, _ = common.train_steps(model, batches, lr=args.lr)
    times: list[float] = []
    if args.steps:
        data = common.random_batches(
            vocab, args.micro_batch, args.seq, args.warmup + args.steps, args.seed
        )
        _, times = common.train_steps(model, data, lr=args.lr)
        times = times[args.warmup :]
    prof: dict[str, Any] = {}
    if args.profile:
        data = common.random_batches(vocab, args.micro_batch, args.seq, args.profile + 1, args.seed)
        prof = {"profile": common.profile_steps(model, data, lr=args.lr)}
    step_s = common.median(times)
    tokens = args.micro_batch * args.seq
    tps = tokens / step_s if times else float("nan")
    fpt = common.flops_per_token(args.model, args.seq, args.lora_r)
    return {
        "tokens_per_s": round(tps, 1),
        "step_s_median": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times],
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / common.GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / common.GIB, 3),
        "mfu": round(tps * fpt / (common.PEAK_TFLOPS * 1e12), 4) if times else None,
        "losses": [round(v, 5) for v in losses],
        "tokens_per_step": tokens,
        **extra,
        **prof,
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.stack == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers)
    head = {
        "stack": args.stack, "model": args.model, "seq": args.seq, "micro_batch": args.micro_batch,
        "grad_ckpt": args.grad_ckpt, "lora_r": args.lora_r, "mem_cap_gib": args.mem_cap_gib,
        "cache": args.cache, "tag": args.tag,
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        result = {**head, **measure(args), "ok": True}
    except Exception as exc:  # one JSON line whatever broke; the trace goes to stderr
        traceback.print_exc()
        oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
        msg = f"{'OOM ' if oom else ''}{type(exc).__name__}: {str(exc)[:400]}"
        result = {**head, "ok": False, "error": msg}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
