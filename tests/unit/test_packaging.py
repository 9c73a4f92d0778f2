"""Packaging: the package-dir mapping, the public API and the light import."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import loraburst
import loraburst.providers
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    listed = set(cfg["packages"])
    for pkg, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((pkg, *rel)) in listed, f"{init} is not in [tool.setuptools] packages"


def test_all_is_sorted_and_resolvable() -> None:
    for mod in (loraburst, loraburst.providers):
        assert list(mod.__all__) == sorted(mod.__all__), mod.__name__
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"


def test_public_names_are_documented_and_exported_once() -> None:
    import loraburst.testing

    seen: dict[str, str] = {}
    for mod in (loraburst, loraburst.providers, loraburst.testing):
        for name in mod.__all__:
            assert name not in seen, f"{name} is exported by {seen[name]} and {mod.__name__}"
            seen[name] = mod.__name__
            obj = getattr(mod, name)
            # Classes and functions carry their own docstring (a class's is not inherited);
            # constants and typing aliases are described where they are defined.
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert (obj.__doc__ or "").strip(), f"{mod.__name__}.{name} has no docstring"


def test_every_error_users_can_see_is_exported() -> None:
    import loraburst.providers.lambdalabs
    import loraburst.providers.local
    import loraburst.providers.runpod
    import loraburst.providers.ssh  # noqa: F401  (their errors, if any, join the tree)

    def tree(cls: type) -> set[type]:
        return {cls}.union(*(tree(sub) for sub in cls.__subclasses__()))

    unexported = {c.__name__ for c in tree(loraburst.LoraburstError)} - set(loraburst.__all__)
    assert not unexported, f"errors raised to users but not exported: {sorted(unexported)}"


def test_errors_share_one_root() -> None:
    for name in loraburst.__all__:
        obj = getattr(loraburst, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, loraburst.LoraburstError), name
    assert issubclass(loraburst.ConfigError, ValueError)


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, loraburst, loraburst.providers, loraburst.remote.protocol;"
        "from loraburst import Job;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes')"
        " if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_builtin_providers_are_entry_points() -> None:
    names = {ep.name for ep in entry_points(group="loraburst.providers")}
    assert {"local", "ssh", "runpod", "lambda"} <= names


def test_remote_imports_only_stdlib_and_itself(tmp_path: Path) -> None:
    # The agent must start on a bare instance: the bundled remote code alone, no client code,
    # no third-party imports at module level (the trainer imports torch & co. in functions).
    # `python -S` leaves site-packages out, so any such import fails here.
    from loraburst._data.bundle import _code_files

    code_dir = tmp_path / "code" / "loraburst"
    code_dir.mkdir(parents=True)
    (code_dir / "__init__.py").write_text("")
    modules = []
    for name, py in _code_files():  # exactly what a bundle ships
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(py.read_bytes())
        rel = Path(name).relative_to("code").with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules.append(".".join(parts))
    assert (
        "loraburst.remote.recipes.sft" in modules and "loraburst.remote.fastpath.planner" in modules
    )
    code = "import " + ", ".join(modules)
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path / "code")},
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loraburst._cli", "version"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("loraburst ")
