"""Rows shaped like real instruction data, for the benchmark tokenizer of ``common.py``.

Real SFT sets (OpenHermes, UltraChat, Magicoder) have log-normal row lengths: most rows a few
hundred tokens, a long tail to the context limit. Here a row's length in tokens is drawn from
a log-normal law (median ``median`` tokens, spread ``sigma``) and capped, and its words come
from a fixed bigram chain over the tokenizer's 256 word tokens, so there is something to learn
(the loss falls) and every stack sees the same rows.

- **text rows** ``{"text": ...}``: the loss is on every token.
- **chat rows** ``{"messages": [system, user, assistant]}``: about a third of the tokens are
  the prompt, the rest the answer; the loss is on the answer only.

``python benchmarks/realistic_data.py OUT.jsonl --rows 6000 --kind text`` writes a file.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

__all__ = ["chat_rows", "row_lengths", "text_rows", "word", "write_jsonl"]

_WORDS = 256
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def word(i: int) -> str:
    """The benchmark vocabulary's word ``i`` (its token id in the benchmark tokenizer).

    Letters only: Qwen2's tokenizer splits every digit from a word (``t12`` -> ``t``, ``1``,
    ``2``), and transformers 5 rebuilds a Qwen2 folder's tokenizer from its vocabulary and merges
    whatever class the folder names, so words with digits could not be one token each there.
    """
    return _LETTERS[i // 26] + _LETTERS[i % 26]


def row_lengths(n: int, *, median: float = 350, sigma: float = 0.8, cap: int = 2040,
                seed: int = 0) -> list[int]:  # fmt: skip
    """``n`` token counts, log-normal around ``median``, between 8 and ``cap``."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [max(8, min(cap, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def _chain(seed: int) -> list[list[int]]:
    """For each word, the few words that may follow it (a learnable bigram structure)."""
    rng = random.Random(f"chain:{seed}")
    return [[rng.randrange(_WORDS) for _ in range(4)] for _ in range(_WORDS)]


def _words(n: int, rng: random.Random, chain: list[list[int]]) -> str:
    w = rng.randrange(_WORDS)
    out = []
    for _ in range(n):
        out.append(word(w))
        w = rng.choice(chain[w]) if rng.random() < 0.9 else rng.randrange(_WORDS)
    return " ".join(out)


def text_rows(n: int, *, seed: int = 0, **lengths: Any) -> list[dict[str, Any]]:
    """Plain-text rows; a row of ``k`` words is ``k`` tokens (plus bos/eos)."""
    rng = random.Random(f"text:{seed}")
    chain = _chain(seed)
    return [{"text": _words(k, rng, chain)} for k in row_lengths(n, seed=seed, **lengths)]


def chat_rows(n: int, *, seed: int = 0, **lengths: Any) -> list[dict[str, Any]]:
    """System/user/assistant rows; about a third of each row's tokens are the prompt."""
    rng = random.Random(f"chat:{seed}")
    chain = _chain(seed)
    rows = []
    for k in row_lengths(n, seed=seed, **lengths):
        body = max(6, k - 8)  # role markers and end-of-turn tokens
        prompt = max(2, round(body * rng.uniform(0.15, 0.5)))
        system = min(8, prompt // 3)
        rows.append({
            "messages": [
                {"role": "system", "content": _words(max(1, system), rng, chain)},
                {"role": "user", "content": _words(max(1, prompt - system), rng, chain)},
                {"role": "assistant", "content": _words(max(1, body - prompt), rng, chain)},
            ]
        })  # fmt: skip
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--kind", choices=["text", "chat"], default="text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make = text_rows if args.kind == "text" else chat_rows
    rows = make(args.rows, seed=args.seed)
    write_jsonl(rows, args.out)
    lengths = row_lengths(args.rows, seed=args.seed)
    print(f"{args.out}: {len(rows)} rows, median {statistics.median(lengths)} tokens, "
          f"mean {statistics.fmean(lengths):.0f}, longest {max(lengths)}")  # fmt: skip


if __name__ == "__main__":
    main()
