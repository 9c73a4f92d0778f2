"""Preference tuning: DPO on QLoRA with a tiny Llama on this machine, then the preference it
learned.

    python examples/preference.py [--from-adapter FOLDER]

1. builds the quickstart's tiny model (random weights, a tokenizer trained on the sample data)
   into ``examples/outputs/tiny-model``, unless it is there already;
2. runs ``examples/preference.yaml`` on the local provider: the 64 pairs of
   ``data/preference.jsonl`` are checked, then DPO trains a LoRA adapter on the NF4 base, the
   reference being the same base with the adapter switched off;
3. prints the reward margin and accuracy (how much more the adapter prefers the chosen answer
   than the reference does), and the tuned model's log-probability of a right and a wrong
   answer to one question.

``--from-adapter`` starts from an adapter a previous job wrote (say the quickstart's SFT one);
it is trained further and is its own reference.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
JOB_FILE = HERE / "preference.yaml"
MODEL_DIR = HERE / "outputs" / "tiny-model"
QUESTION = "What is the capital of Japan?"
ANSWERS = ("The capital of Japan is Tokyo.", "The capital of Japan is Madrid.")


def build_model() -> Path:
    """The tiny model the job tunes (the quickstart's; built once, reused after)."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    from loraburst.testing import make_tiny_model

    lines = (HERE / "data" / "chat.jsonl").read_text().splitlines()
    texts = [m["content"] for line in lines if line.strip() for m in json.loads(line)["messages"]]
    return make_tiny_model(MODEL_DIR, texts, hidden_size=128, intermediate=256)


def train(from_adapter: str | None) -> Any:
    """Run the job (from ``from_adapter`` when given); returns its JobResult."""
    from loraburst import Job

    job = Job.from_yaml(JOB_FILE)
    if from_adapter:
        job = Job.from_spec(job.spec.model_copy(update={"init_adapter": from_adapter}))
    print(f"data:      {job.validate().stats.describe()}")
    result = job.run(provider="local")
    assert result.adapter_path is not None, f"the job ended as {result.status}"
    return result


def answer_logps(adapter: Path | None) -> list[float]:
    """Log-probability of each of ``ANSWERS`` to ``QUESTION``: base (+ adapter), NF4 as in
    training (the adapter learned to correct that base)."""
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
    out = []
    prompt = [{"role": "user", "content": QUESTION}]
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    for text in ANSWERS:
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": text}],
                                             tokenize=False)  # fmt: skip
        n = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        picked = logps.gather(1, ids[0, 1:, None]).squeeze(1)[n - 1 :]
        out.append(float(picked.sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-adapter", help="start from this adapter folder")
    args = parser.parse_args()
    build_model()
    result = train(args.from_adapter)
    m = result.metrics
    print(f"adapter:   {result.adapter_path}")
    print(
        f"margin:    {m['first_reward_margin']:.3f} -> {m['final_reward_margin']:.3f} "
        f"(accuracy {m['first_reward_accuracy']:.2f} -> {m['final_reward_accuracy']:.2f}) "
        f"over {m['steps']} steps"
    )
    after = answer_logps(result.adapter_path)
    print(f"Q: {QUESTION}")
    for text, logp in zip(ANSWERS, after, strict=True):
        print(f"   log p = {logp:8.2f}  {text}")
    print(f"prefers:   {'right' if after[0] > after[1] else 'wrong'} answer")


if __name__ == "__main__":
    main()
