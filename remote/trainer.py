"""The trainer's entry: read the bundle's typed spec and run the recipe that trains it.

Recipes live in :mod:`.recipes` (one per objective and backend) over the shared building
blocks of :mod:`.training`. Torch and friends are imported inside functions:
``loraburst.remote`` itself is stdlib-only. :func:`load_model`, :func:`load_tokenizer`,
:func:`compute_dtype` and :func:`latest_checkpoint` are the helpers the benchmarks reuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import BUNDLE_DIR, BundleSpec
from .recipes import recipe_for
from .training.checkpoints import latest_checkpoint
from .training.loading import compute_dtype, load_model, load_tokenizer

if TYPE_CHECKING:
    from .agent import Reporter

__all__ = ["compute_dtype", "latest_checkpoint", "load_model", "load_tokenizer", "run"]


def run(workdir: Path, reporter: Reporter | None = None) -> None:
    """Train the job in ``workdir`` (see :mod:`.protocol`) and write its artifacts.

    Raises:
        FileNotFoundError: the spec or a local model folder is missing (the message names it).
        ValueError: spec.json has a key this code does not know.
        loraburst.remote._data.DataError: a row cannot be used (names the file and row).
    """
    if reporter is None:
        from .agent import Reporter

        reporter = Reporter(workdir)
    bundle = BundleSpec.read(workdir / BUNDLE_DIR / "spec.json")
    recipe_for(bundle).run(workdir, bundle, reporter)
