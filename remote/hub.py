"""Push a job's verified exports to a Hugging Face Hub model repo, with a model card.

The token comes from ``HF_TOKEN`` in the agent's environment (sent over SSH, never written to a
file); it is passed to ``huggingface_hub`` directly and scrubbed from any error message we
record. ``hub.endpoint`` (or ``HF_ENDPOINT``) points at another hub, such as the test fake.
After the commit the repo's file list is read back and every file's size (and, for LFS files,
sha256) compared with what was sent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .protocol import sha256_file

__all__ = ["model_card", "push"]

ENV_TOKEN = "HF_TOKEN"


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def model_card(
    spec: dict[str, Any],
    doc: dict[str, Any],
    metrics: dict[str, Any],
    results: list[dict[str, Any]],
) -> str:
    """README.md: base, data, method, steps, final loss, and each export with its checks."""
    base = spec.get("base_model") or spec["model"]
    base_id = base if "/" in str(base) and not Path(str(base)).is_absolute() else None
    data = spec.get("dataset_name") or spec.get("dataset")
    rows = metrics.get("data", {})
    lora, quant, train = spec.get("lora", {}), spec.get("quant", {}), spec.get("train", {})
    method = spec.get("method", "qlora")
    bits = quant.get("bits") if method != "lora" else 16
    tags = ["loraburst", method, *sorted({r["kind"] for r in results if r["ok"]})]
    front = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags]]
    if base_id:
        front.append(f"base_model: {base_id}")
    if isinstance(data, str) and doc.get("data_format") == "hub":
        front += ["datasets:", f"- {data}"]
    front.append("---")
    loss = metrics.get("final_loss")
    lines = [
        *front,
        "",
        f"# {spec.get('name') or Path(str(base)).name} fine-tuned with loraburst",
        "",
        f"- **Base model:** {base}",
        f"- **Data:** {data} ({doc.get('data_format', '?')} format"
        + (f", {rows.get('rows')} rows, {rows.get('tokens')} tokens" if rows.get("rows") else "")
        + ")",
        f"- **Method:** {method} (LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, targets "
        f"{lora.get('target_modules')}; base weights in {bits} bits during training"
        + (f", {quant.get('quant_type')}" if bits == 4 else "")
        + ")",
        f"- **Steps:** {metrics.get('steps')} (max_seq_len {train.get('max_seq_len')}, "
        f"learning rate {train.get('learning_rate')})",
        f"- **Final loss:** {loss:.4f}"
        if isinstance(loss, (int, float))
        else "- **Final loss:** n/a",
        "",
        "## Files and the checks they passed before upload",
        "",
    ]
    for r in results:
        if not r["ok"]:
            continue
        what = r["details"].get("statement") or r["details"].get("tool") or ""
        lines.append(f"- `{r['name']}`{': ' + what if what else ''}")
        for c in r["checks"]:
            verdict = "measured" if c["ok"] is None else ("passed" if c["ok"] else "FAILED")
            lines.append(f"  - {c['name']} ({verdict}): {c['detail']}")
    lines.append("")
    return "\n".join(lines)


def push(hub: dict[str, Any], files: dict[str, Path], card: str) -> dict[str, Any]:
    """Create the repo (if needed), commit ``files`` (repo path -> local file) and the card,
    and check what the hub then lists. Never raises: the result says ``ok`` and why not."""
    token = os.environ.get(ENV_TOKEN)
    repo = str(hub.get("repo"))
    result: dict[str, Any] = {"ok": False, "repo": repo, "url": None, "commit": None,
                              "files": sorted([*files, "README.md"]), "error": None}  # fmt: skip
    if not token:
        result["error"] = f"{ENV_TOKEN} is not set in the agent's environment; nothing was pushed"
        return result
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(endpoint=hub.get("endpoint") or None, token=token)
        url = api.create_repo(repo, private=bool(hub.get("private", True)), exist_ok=True,
                              repo_type="model")  # fmt: skip
        ops = [
            CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v))
            for k, v in sorted(files.items())
        ]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        info = api.create_commit(
            repo, ops, commit_message=str(hub.get("commit_message") or "Upload from loraburst"),
            revision=hub.get("revision") or None,
        )  # fmt: skip
        result.update(url=str(url), commit=info.oid)
        listed = {
            s.rfilename: s
            for s in api.model_info(repo, revision=info.oid, files_metadata=True).siblings or []
        }
        problems = []
        for path_in_repo, local in files.items():
            remote = listed.get(path_in_repo)
            if remote is None:
                problems.append(f"{path_in_repo} is not listed")
            elif remote.size is not None and remote.size != local.stat().st_size:
                problems.append(
                    f"{path_in_repo} has {remote.size} bytes, sent {local.stat().st_size}"
                )
            elif remote.lfs is not None and remote.lfs.sha256 != sha256_file(local):
                problems.append(f"{path_in_repo}: sha256 differs")
        result["ok"] = not problems
        result["error"] = "; ".join(problems) or None
    except Exception as exc:  # huggingface_hub's errors have no single base worth naming
        result["error"] = _scrub(f"{type(exc).__name__}: {exc}", token)[:1500]
    return result
