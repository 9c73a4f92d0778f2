"""What tests and examples build on: a tiny real model, and the provider contract suite.

- :func:`make_tiny_model`: a genuine causal LM (random weights, a real config, a byte-level BPE
  tokenizer trained on the caller's texts) that trains on CPU in seconds, so a job's every code
  path runs without a hub download. The quickstart and the examples use it.
- ``ProviderContract``: the contract tests every provider plugin subclasses (needs pytest;
  imported on first use, so that ``make_tiny_model`` does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._tiny import TINY_SPECIAL_TOKENS, make_tiny_model

if TYPE_CHECKING:
    from ._contract import ProviderContract

__all__ = ["TINY_SPECIAL_TOKENS", "ProviderContract", "make_tiny_model"]


def __getattr__(name: str) -> Any:
    if name == "ProviderContract":
        from ._contract import ProviderContract

        return ProviderContract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
