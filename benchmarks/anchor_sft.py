"""The anchors' own SFT paths, as their users run them, on a JSONL of ``{"text": ...}`` rows.

- ``unsloth``: ``FastLanguageModel.from_pretrained(load_in_4bit=True)`` + ``get_peft_model`` +
  TRL's ``SFTTrainer`` (Unsloth's documented recipe; ``../shared/unsloth-on-h200.md``).
- ``vanilla``: transformers ``from_pretrained`` with bitsandbytes NF4 (double quant, bf16
  compute), ``prepare_model_for_kbit_training``, peft LoRA, TRL's ``SFTTrainer``.

One process per run (Unsloth patches transformers on import). Prints one JSON object (and
writes it to ``--out``): per-step wall times (each step ends on a CUDA sync), tokens per step,
losses, peak memory and the time from process start to the end of the first step.

Tokens are counted from what the model is actually given: a forward pre-hook on the trained model
adds each gradient-enabled call's non-padding tokens (``attention_mask.sum()``, or every position
of a padding-free row), and the trainer's own ``num_input_tokens_seen`` is kept beside it as
``trainer_step_tokens``, a cross-check. ``first_inputs`` records the shapes of the first call.
(On the H200 both agreed: Unsloth's SFT path feeds two padding-free micro-batches of 4 x 2,048
positions per optimizer step.)

    python benchmarks/anchor_sft.py --stack unsloth --model /tmp/models/llama-3-8b \\
        --data rows.jsonl --steps 30 --micro-batch 4 --packing --grad-ckpt off
"""

from __future__ import annotations

import sys
import time

T_START = time.time()
if "--stack" in sys.argv and sys.argv[sys.argv.index("--stack") + 1] == "unsloth":
    import unsloth  # noqa: F401  (must come before transformers)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    if args.stack == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            args.model, max_seq_length=args.max_len, dtype=torch.bfloat16, load_in_4bit=True
        )
        ckpt: Any = {"off": False, "on": True, "unsloth": "unsloth"}[args.grad_ckpt]
        model = FastLanguageModel.get_peft_model(
            model, r=args.r, lora_alpha=2 * args.r, lora_dropout=0, bias="none",
            target_modules=PROJECTIONS, use_gradient_checkpointing=ckpt, random_state=args.seed,
        )  # fmt: skip
        return model, tok
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa",
    )  # fmt: skip
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=args.grad_ckpt != "off"
    )
    cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, bias="none",
                     target_modules=PROJECTIONS, task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, cfg), tok


class _FedTokens:
    """Non-padding tokens the model is given in gradient-enabled forwards (no host sync per call).

    No-grad forwards (metrics computed a second time) are not training tokens and are skipped.
    """

    def __init__(self, model: Any) -> None:
        import torch

        self.count = torch.zeros((), dtype=torch.int64, device="cuda")
        self.first: dict[str, Any] = {}
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any) -> None:
        import torch

        if not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if not self.first:
            self.first = {k: list(v.shape) for k, v in kwargs.items() if hasattr(v, "shape")}
        if mask is not None and mask.dim() == 2:
            self.count += mask.sum()
        elif ids is not None:
            self.count += ids.numel()

    def total(self) -> int:
        return int(self.count.item())  # called at step boundaries, after the CUDA sync


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", choices=["unsloth", "vanilla"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--grad-ckpt", choices=["off", "on", "unsloth"], default="off")
    parser.add_argument("--mem-cap-gib", type=float, default=None)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if args.mem_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory / 1024**3
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib / total))
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tok = _model(args)
    data = load_dataset("json", data_files=args.data, split="train")
    times: list[float] = []
    tokens: list[int] = []
    trainer_tokens: list[int] = []
    first_step_at: list[float] = []
    fed = _FedTokens(model)

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            self.t0 = time.time()
            self.n0 = state.num_input_tokens_seen
            self.f0 = fed.total()

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            now = time.time()
            times.append(now - self.t0)
            trainer_tokens.append(int(state.num_input_tokens_seen - self.n0))
            tokens.append(fed.total() - self.f0)
            if not first_step_at:
                first_step_at.append(now)

    config = SFTConfig(
        output_dir="/tmp/anchor-out", max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        max_length=args.max_len, packing=args.packing, bf16=True, logging_steps=1,
        dataset_text_field="text", learning_rate=args.lr, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=3, include_num_input_tokens_seen="non_padding",
        save_strategy="no", report_to="none", seed=args.seed, disable_tqdm=True,
        gradient_checkpointing=args.stack == "vanilla" and args.grad_ckpt != "off",
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=config,
                         callbacks=[Clock()])  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    t_train = time.time()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "stack": args.stack,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "step_s": times,
        "step_tokens": tokens,
        "trainer_step_tokens": trainer_tokens,
        "first_inputs": fed.first,
        "losses": losses,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 1024**3,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 1024**3,
        "to_first_step_s": (first_step_at[0] - T_START) if first_step_at else None,
        "train_s": time.time() - t_train,
    }
    text = json.dumps(out)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
