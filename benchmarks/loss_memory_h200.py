"""The chunked loss's peak memory per logits element, against the planner's constants.

For each vocabulary (Llama-3's, Qwen2's, Gemma-2's with its final soft-cap) the trainer's
``linear_cross_entropy`` runs forward over 8,192 tokens of bf16 hidden states at its default
chunk. Its forward makes the gradients too (the backward only scales them), so the forward's
peak above what was allocated before, less the hidden states' gradient it keeps, is divided by
one chunk's ``chunk x vocab`` elements. ``remote.planning`` plans with
``LOSS_BYTES_PER_ELEMENT`` (``SOFTCAP_LOSS_BYTES_PER_ELEMENT`` with a soft-cap). CUDA only.

    python benchmarks/loss_memory_h200.py   # writes results/loss_memory.json
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
RESULTS = HERE / "results" / "loss_memory.json"
CASES = [("llama-3 128K", 128256, None), ("qwen2 152K", 152064, None),
         ("gemma-2 256K, soft-cap 30", 256000, 30.0)]  # fmt: skip


def main() -> None:
    import torch
    from loraburst.remote import planning
    from loraburst.remote.fastpath import linear_cross_entropy

    tokens, hidden = 8192, 4096
    rows = []
    for name, vocab, softcap in CASES:
        torch.manual_seed(0)
        weight = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16) * 0.02
        h = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (1, tokens), device="cuda")
        chunk = planning.default_loss_chunk(vocab)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = linear_cross_entropy(h, weight, labels, softcap=softcap)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - h.numel() * h.element_size()
        planned = (planning.SOFTCAP_LOSS_BYTES_PER_ELEMENT if softcap
                   else planning.LOSS_BYTES_PER_ELEMENT)  # fmt: skip
        rows.append({"vocab": name, "chunk_tokens": chunk, "tokens": tokens,
                     "measured_bytes_per_element": round(extra / (chunk * vocab), 3),
                     "planned_bytes_per_element": planned})  # fmt: skip
        print(rows[-1], flush=True)
        del weight, h, labels, loss
        torch.cuda.empty_cache()
    doc = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "rows": rows}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
