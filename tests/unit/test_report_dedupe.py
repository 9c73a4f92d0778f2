"""The data report's duplicate search gives the same findings as it always did.

``report_findings.json`` holds every finding of a crafted dataset (exact and near duplicates,
ASCII and not, eval overlap, echoes, encoding damage) as the first, regex-and-string version
of the report found them; the faster paths (ASCII rows split and hashed as bytes, a damage scan
that skips clean ASCII) must find exactly the same, and agree with the regexes they stand for.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from loraburst._data import report

from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "data" / "report_findings.json"
KEPT = ("duplicates", "near_duplicates", "eval_overlap", "echoes", "damaged")


def crafted() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and eval rows with every kind of duplicate, in ASCII and not."""
    rnd = random.Random(7)
    vocab = ["alpha", "beta", "gamma", "delta", "café", "naïve", "東京", "data", "x_1", "Ünïcode",
             "word", "the", "a", "of", "it's", "3.14", "e-mail"]  # fmt: skip
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for _ in range(40):
        n = rnd.randrange(1, 90)
        ascii_only = rnd.random() < 0.5
        pool = [w for w in vocab if w.isascii()] if ascii_only else vocab
        base = " ".join(rnd.choice(pool) for _ in range(n))
        train.append({"text": base})
        if rnd.random() < 0.3:
            train.append({"text": base})
        if rnd.random() < 0.5:
            words = base.split()
            words[rnd.randrange(len(words))] = rnd.choice(pool)
            tail = rnd.choice(["", "!", " ...", "\x07", "Ã©", "\ufffd", "\t\r\n"])
            train.append({"text": " ".join(words) + tail})
        if rnd.random() < 0.2:
            evals.append({"text": base})
        if rnd.random() < 0.2:
            evals.append({"text": base + " and a few more words"})
        if rnd.random() < 0.1:
            train.append({"prompt": base, "completion": base})
        if rnd.random() < 0.1:
            train.append({"messages": [{"role": "user", "content": base},
                                       {"role": "assistant", "content": base.upper()}]})  # fmt: skip
    train += [{"text": "!!! ... ???"}, {"text": "a b"}, {"text": "A B"}, {"text": "\x00x"}]
    return train, evals


def test_findings_match_the_recorded_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "EXAMPLES", 1000)  # keep every example, not the first five
    train, evals = crafted()
    with report.ReportBuilder(64) as builder:
        builder.source("dataset", "train.jsonl")
        for i, row in enumerate(train):
            builder.row(f"train.jsonl:{i + 1}", row, True)
        builder.source("eval_dataset", "eval.jsonl")
        for i, row in enumerate(evals):
            builder.row(f"eval.jsonl:{i + 1}", row, True)
        found = builder.finish().findings
    got = {k: [found[k].count, found[k].examples] for k in KEPT}
    assert got == json.loads(GOLDEN.read_text())
    assert all(got[k][0] for k in KEPT)  # every kind is exercised


def _texts() -> list[str]:
    rnd = random.Random(3)
    alphabet = "ab_Z9 .,'-\t\n\r\x00\x07\x0b\x1f\x7f" + "éÃ©â€™\ufffd東😀ß\u0130"
    texts = ["", " ", "x", "a b c d", "A_B c-d", "İstanbul ß", "\x85 next line"]
    for _ in range(3000):
        n = rnd.randrange(0, 60)
        ascii_only = rnd.random() < 0.6
        texts.append(
            "".join(
                chr(rnd.randrange(128)) if ascii_only else rnd.choice(alphabet) for _ in range(n)
            )
        )
    return texts


def test_fast_scans_agree_with_the_regexes() -> None:
    for text in _texts():
        words = report._words(text)
        expected = report._WORD.findall(text.lower())[: report._MAX_WORDS]
        assert [w.decode() if isinstance(w, bytes) else w for w in words] == expected, text
        # The same signature whether the words come as bytes or as strings.
        assert report._signature(words) == report._signature(expected), text
        m, ref = report._damage(text), report._DAMAGE.search(text)
        assert (m and (m.group(), m.start())) == (ref and (ref.group(), ref.start())), text
