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
from pathlib import Path
from typing import Any

from quickstart import build_model, load_tuned  # beside this file: the same tiny model

HERE = Path(__file__).resolve().parent
JOB_FILE = HERE / "preference.yaml"
QUESTION = "What is the capital of Japan?"
ANSWERS = ("The capital of Japan is Tokyo.", "The capital of Japan is Madrid.")


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
    import torch

    model, tokenizer, device = load_tuned(adapter)
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
