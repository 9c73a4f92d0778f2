"""Quickstart: fine-tune a tiny Llama with QLoRA on this machine, then ask it a question.

    python examples/quickstart.py

1. builds a tiny real model (random weights, a tokenizer trained on the sample data) into
   ``examples/outputs/tiny-model`` — no download needed;
2. runs ``examples/quickstart.yaml`` on the local provider: bitsandbytes NF4 base weights,
   LoRA adapters, loss only on the assistant's answers;
3. prints where the verified adapter is, the loss, base against tuned on the held-out rows
   and where the run's report is (report.html beside the adapter), and answers one question
   with base + adapter.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraburst import JobResult

HERE = Path(__file__).resolve().parent
JOB_FILE = HERE / "quickstart.yaml"
MODEL_DIR = HERE / "outputs" / "tiny-model"
QUESTION = "What is the capital of Japan?"


def build_model() -> Path:
    """The tiny model the job fine-tunes (built once, reused after)."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    from loraburst.testing import make_tiny_model

    lines = (HERE / "data" / "chat.jsonl").read_text().splitlines()
    texts = [m["content"] for line in lines if line.strip() for m in json.loads(line)["messages"]]
    return make_tiny_model(MODEL_DIR, texts, hidden_size=128, intermediate=256)


def train() -> JobResult:
    """Run the job; returns its result (adapter folder, metrics, evaluation, report)."""
    from loraburst import Job

    result = Job.from_yaml(JOB_FILE).run(provider="local")
    assert result.adapter_path is not None, f"the job ended as {result.status}"
    return result


def load_tuned(adapter: Path | None) -> tuple[Any, Any, str]:
    """Base (+ ``adapter``) as trained, its tokenizer and device.

    The base is loaded in NF4 as in training: the adapter learned to correct *that* base, and
    on a tiny random model the rounding of NF4 matters. The adapter folder carries the chat
    template (and any tokens training added).
    """
    # An optional CPU kernel from the hub that bitsandbytes looks for; the built-in path works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
    )
    device = "cuda" if cuda else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, quantization_config=nf4, device_map={"": device}
    )
    tokenizer = AutoTokenizer.from_pretrained(adapter or MODEL_DIR)
    if adapter is not None:
        model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, adapter)
    return model, tokenizer, device


def answer(adapter: Path, question: str) -> str:
    """Greedy answer from base + adapter."""
    model, tokenizer, device = load_tuned(adapter)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt.to(device), max_new_tokens=24, do_sample=False)
    new_tokens = out[0, prompt["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()


def main() -> None:
    t0 = time.time()
    build_model()
    result = train()
    assert result.adapter_path is not None
    adapter, metrics = result.adapter_path, result.metrics
    wall = time.time() - t0
    print(f"adapter:   {adapter}")
    print(
        f"loss:      {metrics['first_loss']:.2f} -> {metrics['final_loss']:.2f} "
        f"over {metrics['steps']} steps (eval loss {metrics.get('eval_loss', float('nan')):.2f})"
    )
    ev = result.evaluation
    if ev:
        print(f"eval loss: base {ev['base_eval_loss']:.2f} -> tuned {ev['tuned_eval_loss']:.2f}")
    print(f"report:    {result.report_path}")
    print(f"wall time: {wall:.0f}s (model build + training + checks)")
    print(f"Q: {QUESTION}\nA: {answer(adapter, QUESTION)}")


if __name__ == "__main__":
    main()
