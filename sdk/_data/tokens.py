"""Token counts of normalised rows: exact with the model's tokenizer when it is on disk, else an
estimate that says it is one.

Exact counts follow what TRL's ``SFTTrainer`` feeds the model: a conversation is rendered with
the tokenizer's chat template (or our ChatML default) and tokenised without extra special tokens;
prompt/completion and text rows get the EOS token appended, as TRL does, and the tokenizer's
usual special tokens (BOS, say).

Memory stays bounded whatever the rows' length: a tokenizer call never sees more than
``_BATCH_CHARS`` characters (fast tokenizers keep a few hundred bytes per token), and a row longer
than ``_CHUNK_CHARS`` is counted in pieces cut before whitespace, where pre-tokenizers split
anyway; such a row's count may differ from one tokenisation of the whole by a token a piece.
"""

from __future__ import annotations

import array
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loraburst.remote.protocol import DEFAULT_CHAT_TEMPLATE

from .preference import PREFERENCE_FORMAT, pair_sequences

__all__ = [
    "CHARS_PER_TOKEN",
    "TURN_OVERHEAD_TOKENS",
    "TokenTally",
    "count_tokens",
    "load_tokenizer",
    "row_chars",
]

log = logging.getLogger(__name__)

# English text runs at about 3.5-4 characters per token with Llama-3-class BPE vocabularies
# (128k entries; Qwen2 and Mistral-Nemo's are similar). 3.6 leans to the low end so the
# estimate errs towards more tokens, i.e. towards time and cost we will not exceed.
CHARS_PER_TOKEN = 3.6
# Tokens a chat template adds around each turn: ChatML's "<|im_start|>", role, "\n",
# "<|im_end|>", "\n" is 4-5 tokens; Llama-3's header tokens are about the same.
TURN_OVERHEAD_TOKENS = 4

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Rows tokenised without a chat template (a preference pair may hold conversations).
_PLAIN_KINDS = ("text", "prompt_completion")
_BATCH = 1024
# Characters per tokenizer call and per piece of a long row: half a million characters cost the
# tokenizer a few hundred MB at most (a 50 MB row tokenised whole took 10 GB).
_BATCH_CHARS = 1 << 19
_CHUNK_CHARS = 1 << 17


def _on_disk(name: str) -> bool:
    """Whether a tokenizer could load without the network, checked without importing transformers."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return any((folder / f).is_file() for f in _TOKENIZER_FILES)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in _TOKENIZER_FILES)
    except ValueError:  # not a valid repo id
        return False


def load_tokenizer(name: str | None, *, chat: bool = True) -> Any | None:
    """The tokenizer at a local folder or in the local HF cache, or None when unavailable.

    Without ``chat`` (rows that need no chat template) a folder's ``tokenizer.json`` is used
    through the ``tokenizers`` library alone where transformers would use it unchanged
    (``tokenizer_file``): the same counts without importing transformers.

    Never raises: a tokenizer that cannot be loaded only makes the counts estimates.
    """
    if not name or not _on_disk(name):
        return None
    if not chat:
        from .tokenizer_file import load

        plain = load(name)
        if plain is not None:
            return plain
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.info("transformers is not installed; token counts are estimates")
        return None
    try:
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()), local_files_only=True)
    # Tokenizer loading fails in many library-specific ways (OSError, ValueError, KeyError,
    # a missing sentencepiece); any of them only means we fall back to the estimate.
    except Exception as e:
        log.warning("cannot load tokenizer %s (%s); token counts are estimates", name, e)
        return None


def row_chars(row: dict[str, Any]) -> int:
    """Characters of text in a normalised row (turn contents, prompt + completion, or text; a
    preference pair counts both of its sequences)."""
    if "chosen" in row:
        return sum(row_chars(r) for r in pair_sequences(row)[1])
    if "messages" in row:
        return sum(len(m["content"]) for m in row["messages"])
    if "prompt" in row:
        return len(row["prompt"]) + len(row["completion"])
    return len(row.get("text", ""))


def _estimate(row: dict[str, Any]) -> int:
    if "chosen" in row:  # a preference pair: prompt + chosen, and prompt + rejected
        return sum(_estimate(r) for r in pair_sequences(row)[1])
    turns = len(row["messages"]) if "messages" in row else 1  # one EOS for non-chat rows
    return math.ceil(row_chars(row) / CHARS_PER_TOKEN) + turns * TURN_OVERHEAD_TOKENS


def _ids(encoding: Any) -> list[Any]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    return list(encoding["input_ids"] if hasattr(encoding, "keys") else encoding)


def _exact(
    rows: Sequence[dict[str, Any]], kind: str, tok: Any, chat_template: str | None = None
) -> list[int]:
    if kind == PREFERENCE_FORMAT:  # each pair is two sequences: count both, sum per pair
        sub, _ = pair_sequences(rows[0]) if rows else ("text", [])
        counts = _exact([s for r in rows for s in pair_sequences(r)[1]], sub, tok, chat_template)
        return [a + b for a, b in zip(counts[::2], counts[1::2], strict=True)]
    if kind == "messages":
        template = _template(chat_template) or getattr(tok, "chat_template", None)
        template = template or DEFAULT_CHAT_TEMPLATE
        texts = [
            tok.apply_chat_template(r["messages"], chat_template=template, tokenize=False)
            for r in rows
        ]
        special = False  # the template already writes any BOS it wants
    else:
        eos = getattr(tok, "eos_token", None) or ""
        if kind == "prompt_completion":
            joined = [r["prompt"] + r["completion"] for r in rows]
        else:
            joined = [r["text"] for r in rows]
        texts = [t if not eos or t.endswith(eos) else t + eos for t in joined]
        special = True
    counts = [0] * len(texts)
    short = [(i, t) for i, t in enumerate(texts) if len(t) <= _CHUNK_CHARS]
    for batch in _batches(short):
        encoded = _ids(tok([t for _, t in batch], add_special_tokens=special))
        for (i, _), ids in zip(batch, encoded, strict=True):
            counts[i] = len(ids)
    # A long text is counted in pieces without special tokens, plus the ones the tokenizer adds
    # once per text (what it adds to an empty one).
    long = [(i, p) for i, t in enumerate(texts) if len(t) > _CHUNK_CHARS for p in _pieces(t)]
    if long:
        extra = len(_ids(tok([""], add_special_tokens=True))[0]) if special else 0
        for i in {i for i, _ in long}:
            counts[i] = extra
        for batch in _batches(long):
            encoded = _ids(tok([t for _, t in batch], add_special_tokens=False))
            for (i, _), ids in zip(batch, encoded, strict=True):
                counts[i] += len(ids)
    return counts


def _template(value: str | None) -> str | None:
    """The Jinja of the spec's ``chat_template`` (a name or Jinja), or None."""
    if value is None:
        return None
    from loraburst.remote.templates import TEMPLATES

    named = TEMPLATES.get(value)
    return named.jinja if named else value


def _batches(items: list[tuple[int, str]]) -> Iterator[list[tuple[int, str]]]:
    """``items`` in runs of at most ``_BATCH`` texts and ``_BATCH_CHARS`` characters."""
    batch: list[tuple[int, str]] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= _BATCH or size + len(item[1]) > _BATCH_CHARS):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
    if batch:
        yield batch


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most ``_CHUNK_CHARS`` characters, each cut just before a
    whitespace character where there is one (so that words stay whole)."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        end = start + _CHUNK_CHARS
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        end = cut if cut > start else end
        yield text[start:end]
        start = end
    yield text[start:]


def count_tokens(
    rows: Sequence[dict[str, Any]], kind: str, tokenizer: str | Any | None
) -> tuple[list[int], bool]:
    """Tokens per normalised row, as the trainer will see them.

    Args:
        rows: normalised rows (``messages``, ``prompt``/``completion`` or ``text``).
        kind: ``"messages"``, ``"prompt_completion"`` or ``"text"``.
        tokenizer: a local folder or a hub id in the local cache, an already loaded tokenizer,
            or None.

    Returns:
        ``(counts, exact)``: one count per row, and whether they come from the real tokenizer
        (else they are ``chars / CHARS_PER_TOKEN`` plus ``TURN_OVERHEAD_TOKENS`` a turn).
    """
    chat = kind not in _PLAIN_KINDS
    tok = (
        load_tokenizer(tokenizer, chat=chat)
        if tokenizer is None or isinstance(tokenizer, str)
        else tokenizer
    )
    if tok is not None:
        try:
            return _exact(rows, kind, tok), True
        # A chat template may reject a conversation (raise_exception in Jinja) or need
        # arguments we do not pass; the estimate is still a useful answer.
        except Exception as e:
            log.warning("exact token count failed (%s); falling back to the estimate", e)
    return [_estimate(r) for r in rows], False


@dataclasses.dataclass
class TokenSums:
    """Aggregates of per-row token counts: all that ``DatasetStats`` needs."""

    max_seq_len: int
    total: int = 0
    longest: int = 0
    over: int = 0
    # Every row's count (4 bytes a row: 4 MB per million rows), for the estimate to replay the
    # trainer's batching over.
    lengths: array.array[int] = dataclasses.field(default_factory=lambda: array.array("I"))

    def add(self, count: int) -> None:
        self.lengths.append(count)
        self.total += count
        self.longest = max(self.longest, count)
        self.over += count > self.max_seq_len


class TokenTally:
    """Running token totals over normalised rows fed one at a time, in flat memory.

    The estimate is always kept. With a tokenizer on disk, rows are also counted exactly in
    batches of 1024 (loading the tokenizer only when the first batch is full, so a small
    dataset that fails validation never pays for it); if exact counting fails, the whole
    dataset falls back to the estimate, as ``count_tokens`` does.

    Args:
        kind: ``"messages"``, ``"prompt_completion"`` or ``"text"``.
        tokenizer: a local folder, a hub id in the local cache, a loaded tokenizer, or None.
        max_seq_len: rows longer than this are counted in ``over``.
        chat_template: the spec's ``chat_template`` (a name or Jinja), rendered instead of the
            tokenizer's own.
        on_counts: called with each row's count, in row order (exact counts come a batch at
            a time; estimates where the counts are estimates).
    """

    def __init__(
        self,
        kind: str,
        tokenizer: str | Any | None,
        max_seq_len: int,
        *,
        chat_template: str | None = None,
        on_counts: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.kind = kind
        self.chat_template = chat_template
        self._notify = on_counts or (lambda counts: None)
        self._pending_est: list[int] = []
        self.chars = 0
        self.estimate = TokenSums(max_seq_len)
        wanted = tokenizer is not None and (not isinstance(tokenizer, str) or _on_disk(tokenizer))
        self.exact: TokenSums | None = TokenSums(max_seq_len) if wanted else None
        self._tokenizer = tokenizer
        self._loaded: Any | None = None
        self._pending: list[dict[str, Any]] = []
        self._pending_chars = 0

    def add(self, row: dict[str, Any]) -> None:
        chars = row_chars(row)
        self.chars += chars
        estimate = _estimate(row)
        self.estimate.add(estimate)
        if self.exact is None:
            self._notify([estimate])
        else:
            self._pending.append(row)
            self._pending_est.append(estimate)
            self._pending_chars += chars
            # Bounded by characters as well as rows: 1024 rows of a megabyte each are a GB.
            if len(self._pending) >= _BATCH or self._pending_chars >= _BATCH_CHARS:
                self._flush()

    def _flush(self) -> None:
        rows, self._pending = self._pending, []
        estimates, self._pending_est = self._pending_est, []
        self._pending_chars = 0
        if self.exact is None or not rows:
            if estimates:
                self._notify(estimates)
            return
        if self._loaded is None:
            tok = self._tokenizer
            chat = self.kind not in _PLAIN_KINDS
            self._loaded = load_tokenizer(tok, chat=chat) if isinstance(tok, str) else tok
            if self._loaded is None:
                self.exact = None
                self._notify(estimates)
                return
        try:
            counts = _exact(rows, self.kind, self._loaded, self.chat_template)
        # See count_tokens: a template may reject a conversation; the estimate still stands.
        except Exception as e:
            log.warning("exact token count failed (%s); falling back to the estimate", e)
            self.exact = None
            self._notify(estimates)
            return
        for c in counts:
            self.exact.add(c)
        self._notify(counts)

    def result(self) -> tuple[TokenSums, bool]:
        """``(sums, exact)``: the exact sums when every row was counted exactly, else the
        estimate's."""
        self._flush()
        return (self.exact, True) if self.exact is not None else (self.estimate, False)
