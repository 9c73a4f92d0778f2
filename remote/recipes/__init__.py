"""Training recipes: one per objective (and backend), each composing :mod:`..training`.

A recipe is a module with ``run(workdir, bundle, reporter)``. :func:`recipe_for` picks it from
the job's spec; adding an objective (DPO, ORPO) or a backend (MLX) adds a module here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..backends import resolve_backend
from ..protocol import BundleSpec

__all__ = ["RECIPES", "recipe_for"]

# (objective, backend) -> module of this package (imported lazily: a recipe's imports are its
# own; "auto" resolves to MLX on Apple Silicon, torch elsewhere: remote/backends.py).
RECIPES = {
    ("sft", "torch"): "sft",
    ("sft", "mlx"): "sft_mlx",
    ("dpo", "torch"): "preference",
    ("orpo", "torch"): "preference",
}


def recipe_for(bundle: BundleSpec) -> ModuleType:
    """The recipe module that trains ``bundle``'s job.

    Raises:
        ValueError: no recipe for the job's objective.
    """
    objective = bundle.spec.objective.type
    backend = resolve_backend(bundle.spec.train.backend)
    name = RECIPES.get((objective, backend))
    if name is None:
        raise ValueError(
            f"no training recipe for objective {objective!r} on {backend!r}; "
            f"known: {sorted(RECIPES)}"
        )
    return importlib.import_module(f".{name}", __package__)
