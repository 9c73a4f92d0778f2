"""What the fast path's modules share: the report type, projection names, layer lookup."""

from __future__ import annotations

from typing import Any

__all__ = ["GIB", "PROJECTIONS", "FastpathReport", "decoder_layers"]

GIB = 1024**3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FastpathReport(dict[str, Any]):
    """What :func:`~loraburst.remote.fastpath.optimize` applied (a dict, so it serialises into
    the job's events as is)."""


def decoder_layers(base: Any) -> list[Any]:
    """The decoder layers of a ``*ForCausalLM`` (``base.model.layers``), or []."""
    layers = getattr(getattr(base, "model", None), "layers", None)
    return list(layers) if layers is not None else []
