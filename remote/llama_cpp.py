"""llama.cpp's own converter, quantiser and a generator, at one pinned source version.

The K-quants (``q4_k_m``, ``q5_k_m``, ...) are made the way llama.cpp's users make them:
``convert_hf_to_gguf.py`` writes a 16-bit GGUF from the merged folder, ``llama-quantize`` turns
it into the chosen type. ``llama-simple`` (greedy, stops at the vocabulary's end-of-generation
tokens) then loads each file and generates, which is the check that the file works where it
will be used.

The source is :data:`LLAMA_CPP` and nowhere else. Tools are found in ``$LORABURST_LLAMA_CPP``
(a llama.cpp checkout with ``build/bin``), else in this user's cache, else fetched and built
there: the source of that commit comes from PyPI, as the sdist of the llama-cpp-python release
that vendors it (reachable wherever pip is), or from GitHub by commit; cmake builds only the
three targets (CPU, a few minutes). Each failure raises :class:`LlamaCppError` naming its step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["LLAMA_CPP", "ENV_LLAMA_CPP", "Generation", "LlamaCppError", "Tools", "find", "install"]

# The one pinned llama.cpp: this commit is what llama-cpp-python 0.3.36 vendors.
LLAMA_CPP = {
    "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    "sdist": "llama-cpp-python==0.3.36",
    "git": "https://github.com/ggml-org/llama.cpp",
}
ENV_LLAMA_CPP = "LORABURST_LLAMA_CPP"
_TARGETS = ("llama-quantize", "llama-simple")
LLAMA_CPP_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q4_0": "Q4_0",
                    "q5_0": "Q5_0", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}  # fmt: skip


class LlamaCppError(RuntimeError):
    """A llama.cpp step failed; ``step`` is fetch, build, convert, quantize or generate."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"llama.cpp {step} failed: {message}")
        self.step = step


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``llama-simple`` produced: the text, tokens decoded, and whether it stopped at an
    end-of-generation token before the limit."""

    text: str
    tokens: int
    stopped: bool


@dataclasses.dataclass(frozen=True)
class Tools:
    """A llama.cpp source tree with its built binaries."""

    root: Path
    bin: Path

    @property
    def version(self) -> str:
        stamp = self.root / ".loraburst-commit"
        return stamp.read_text().strip()[:12] if stamp.is_file() else f"at {self.root}"

    def _binary(self, name: str) -> str:
        path = self.bin / name
        if not path.is_file():
            raise LlamaCppError("build", f"{path} is missing; rebuild with the {name} target")
        return str(path)

    def convert(self, merged: Path, out: Path, outtype: str, timeout: float = 7200) -> None:
        """``convert_hf_to_gguf.py`` with the tree's own gguf-py (matching its converter)."""
        _converter_requirements()
        env = {**os.environ, "PYTHONPATH": str(self.root / "gguf-py")}
        env.pop("NO_LOCAL_GGUF", None)
        _run(
            "convert",
            [sys.executable, str(self.root / "convert_hf_to_gguf.py"), str(merged),
             "--outfile", str(out), "--outtype", outtype],
            timeout, env=env,
        )  # fmt: skip

    def quantize(self, src: Path, dest: Path, quant: str, timeout: float = 7200) -> None:
        """``llama-quantize SRC DEST TYPE`` on every core."""
        qtype = LLAMA_CPP_QUANTS.get(quant, quant.upper())
        threads = str(os.cpu_count() or 1)
        _run("quantize", [self._binary("llama-quantize"), str(src), str(dest), qtype, threads],
             timeout)  # fmt: skip

    def generate(self, gguf: Path, prompt: str, limit: int, timeout: float = 600) -> Generation:
        """Greedy generation of at most ``limit`` tokens; ``stopped`` when it ended earlier at
        an end-of-generation token (what llama.cpp, Ollama and LM Studio stop on)."""
        # llama-simple decodes at most about n_predict tokens and breaks at an EOG token; two
        # spare tokens tell a stop at the limit from a stop on EOG.
        out = _run(
            "generate",
            [self._binary("llama-simple"), "-m", str(gguf), "-n", str(limit + 2), prompt],
            timeout,
        )
        m = re.search(r"decoded (\d+) tokens", out.stderr)
        if m is None:
            raise LlamaCppError(
                "generate", f"llama-simple printed no token count: {out.stderr[-400:]}"
            )
        tokens = int(m.group(1))
        text = out.stdout
        text = text[len(prompt) :] if text.startswith(prompt) else text
        return Generation(text=text.strip(), tokens=tokens, stopped=tokens <= limit)


def _run(step: str, argv: list[str], timeout: float, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=cwd, errors="replace")  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaCppError(step, f"{Path(argv[0]).name}: {exc}") from exc
    if done.returncode != 0:
        how = (f"was killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else f"exited {done.returncode}")  # fmt: skip
        raise LlamaCppError(
            step, f"{Path(argv[0]).name} {how}: {_gist(done.stderr or done.stdout)}"
        )
    return done


def _gist(output: str) -> str:
    """The lines of a tool's log that say what went wrong (its logs run to hundreds)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|failed|assert|exception|not", ln, re.I)]
    return " | ".join((errors or lines)[-6:])[-800:]


# What convert_hf_to_gguf.py imports beyond the trainer's stack (it reaches for
# sentencepiece before it looks at the tokenizer's kind).
_CONVERTER_REQUIREMENTS = {"sentencepiece": "sentencepiece>=0.2", "google.protobuf": "protobuf"}


def _converter_requirements() -> None:
    import importlib.util

    missing = [req for mod, req in _CONVERTER_REQUIREMENTS.items()
               if importlib.util.find_spec(mod.split(".")[0]) is None]  # fmt: skip
    if missing:
        _run("convert", [sys.executable, "-m", "pip", "install", "-q", *missing], 900)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loraburst" / f"llama.cpp-{LLAMA_CPP['commit'][:12]}"


def _tools_in(root: Path) -> Tools | None:
    if not (root / "convert_hf_to_gguf.py").is_file():
        return None
    for sub in ("build/bin", "bin", "build"):
        if all((root / sub / t).is_file() for t in _TARGETS):
            return Tools(root, root / sub)
    return None


def find() -> Tools | None:
    """Built llama.cpp tools in ``$LORABURST_LLAMA_CPP`` or the cache, else None."""
    explicit = os.environ.get(ENV_LLAMA_CPP)
    if explicit:
        return _tools_in(Path(explicit))
    return _tools_in(_cache_root())


def _fetch_sdist(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run("fetch", [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                       "--no-binary", ":all:", LLAMA_CPP["sdist"], "-d", tmp], 1800)  # fmt: skip
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            # <project>/vendor/llama.cpp/... (files only; .git/modules/... holds a copy of
            # the submodule's git data under a similar name, which is not the source).
            found = (re.match(r"[^/]+/vendor/llama\.cpp/", m.name) for m in tar.getmembers())
            prefix = next(m.group(0) for m in found if m)[:-1]
            members = [m for m in tar.getmembers() if m.name.startswith(prefix + "/")]
            for m in members:
                if m.issym() or m.islnk() or ".." in Path(m.name).parts:
                    continue
                m.name = m.name[len(prefix) + 1 :]
                tar.extract(m, dest, filter="data")


def _fetch_git(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run("fetch", ["git", "init", "-q"], 60, cwd=dest)
    _run("fetch", ["git", "fetch", "-q", "--depth", "1", LLAMA_CPP["git"], LLAMA_CPP["commit"]],
         1800, cwd=dest)  # fmt: skip
    _run("fetch", ["git", "checkout", "-q", "FETCH_HEAD"], 300, cwd=dest)


def install(log: list[str] | None = None) -> Tools:
    """Fetch the pinned source and build the tools into the cache (once per machine).

    Raises:
        LlamaCppError: naming the step (fetch, build) and the tool's own output.
    """
    found = find()
    if found is not None:
        return found
    root = _cache_root()
    work = root.with_name(root.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    errors = []
    for how, fetch in (("PyPI sdist", _fetch_sdist), ("git", _fetch_git)):
        try:
            fetch(work)
            break
        except LlamaCppError as exc:
            errors.append(f"{how}: {exc}")
            shutil.rmtree(work, ignore_errors=True)
    else:
        raise LlamaCppError("fetch", "; ".join(errors))
    if log is not None:
        log.append(f"llama.cpp {LLAMA_CPP['commit'][:12]} fetched")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaCppError("build", f"{tool} is not installed (apt-get install cmake g++)")
    _run("build", ["cmake", "-S", str(work), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                   "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
         1800)  # fmt: skip
    _run("build", ["cmake", "--build", str(work / "build"), "--target", *_TARGETS,
                   "-j", str(os.cpu_count() or 2)], 3600)  # fmt: skip
    (work / ".loraburst-commit").write_text(LLAMA_CPP["commit"] + "\n")
    shutil.rmtree(root, ignore_errors=True)
    work.rename(root)
    tools = _tools_in(root)
    if tools is None:
        raise LlamaCppError("build", f"the build in {root} produced no {', '.join(_TARGETS)}")
    return tools
