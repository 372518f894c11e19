"""The artifact contract: one directory per model, written atomically, described by `shrinkwrap.json`.

A crash never leaves a half artifact that looks whole: everything is written into a hidden temp
directory beside the target and renamed into place only after the manifest (with every file's
sha256) is complete. The content hash covers the model files only, so recording metrics later
does not change an artifact's identity.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime.errors import UserError

MANIFEST = "shrinkwrap.json"
CARD = "README.md"
FORMAT_VERSION = 1
KINDS = ("reference", "distilled", "pruned", "quantized", "onnx", "tensorrt-llm")
_SELF_FILES = {MANIFEST, CARD}
_TRACKED_LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "lightning", "datasets",
                      "gguf", "onnx", "onnxruntime", "onnxruntime-genai", "numpy", "lm-shrinkwrap")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on: enough to tell two machines apart."""
    desc: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                desc["cpu"] = line.split(":", 1)[1].strip()
                break
    try:
        import torch

        desc["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            desc["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return desc


def command_line(module: str) -> str:
    """How this process was invoked, as a user would type it."""
    if sys.argv and sys.argv[0].endswith(".py"):
        return "python -m " + shlex.join([module, *sys.argv[1:]])
    return shlex.join(sys.argv)


def content_hash(files: list[dict[str, Any]]) -> str:
    """One hash for the model files: sha256 over the sorted (path, sha256) list."""
    h = hashlib.sha256()
    for entry in sorted(files, key=lambda e: e["path"]):
        h.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    return h.hexdigest()


def list_files(root: Path) -> list[dict[str, Any]]:
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in _SELF_FILES:
            files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return files


@dataclass
class Artifact:
    """A verified-on-demand view of an artifact directory."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def parent_path(self) -> Path | None:
        parent = self.manifest.get("parent")
        return Path(parent["path"]) if parent else None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def model_size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"])


def open_artifact(path: str | Path) -> Artifact:
    """Read an artifact's manifest; a missing or unreadable one is a one-line error."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"artifact not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not a Shrinkwrap artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{manifest_path}: not valid JSON ({exc})") from None
    for key in ("kind", "files", "content_hash"):
        if key not in manifest:
            raise UserError(f"{manifest_path}: field '{key}' is missing")
    return Artifact(path=path, manifest=manifest)


def verify(artifact: Artifact) -> list[str]:
    """Every problem found: a missing file, a changed size or hash. Empty when intact."""
    problems = []
    for entry in artifact.manifest["files"]:
        file = artifact.path / entry["path"]
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{file}: size {file.stat().st_size} bytes, manifest says {entry['size']}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 differs from the manifest (the file was modified)")
    if not problems and content_hash(artifact.manifest["files"]) != artifact.content_hash:
        problems.append(f"{artifact.path / MANIFEST}: content_hash does not match its file list")
    return problems


def lineage(artifact: Artifact) -> list[tuple[Artifact | None, dict[str, Any]]]:
    """The chain of parents, nearest first: (parent artifact or None if gone, the recorded link)."""
    chain = []
    current = artifact
    seen = {artifact.path.resolve()}
    while (link := current.manifest.get("parent")) is not None:
        parent_path = Path(link["path"])
        try:
            parent = open_artifact(parent_path)
        except UserError:
            chain.append((None, link))
            break
        chain.append((parent, link))
        if parent_path.resolve() in seen:
            break
        seen.add(parent_path.resolve())
        current = parent
    return chain


def render_card(manifest: dict[str, Any], parent_metrics: dict[str, Any] | None = None) -> str:
    """The model card: what it is, how it was made, how to load it, its numbers beside its parent's."""
    name = manifest.get("name", "artifact")
    lines = [f"# {name}", "", f"A Shrinkwrap **{manifest['kind']}** artifact.", ""]
    if manifest.get("description"):
        lines += [manifest["description"], ""]
    model = manifest.get("model", {})
    if model:
        lines += ["## Model", ""] + [f"- {k}: {v}" for k, v in model.items()] + [""]
    lines += ["## How it was made", "", f"- step: `{manifest['step']['name']}`",
              f"- command: `{manifest['step'].get('command', '')}`", f"- created: {manifest['created']}"]
    parent = manifest.get("parent")
    if parent:
        lines.append(f"- parent: `{parent['path']}` ({parent['kind']}, content hash `{parent['content_hash'][:16]}…`)")
    lines += ["", "Step configuration:", "", "```json", json.dumps(manifest["step"]["config"], indent=2), "```", ""]
    lines += ["## How to load it", "", manifest.get("load_instructions", _default_load(manifest)), ""]
    metrics = manifest.get("metrics", {})
    if metrics:
        lines += ["## Measured", ""]
        keys = [k for k in metrics.get("values", {}) if not isinstance(metrics["values"][k], dict)]
        parent_values = (parent_metrics or {}).get("values", {})
        header = "| metric | this artifact |" + (" parent |" if parent_values else "")
        lines += [header, "|---|---|" + ("---|" if parent_values else "")]
        for k in keys:
            row = f"| {k} | {_fmt(metrics['values'][k])} |"
            if parent_values:
                row += f" {_fmt(parent_values.get(k))} |"
            lines.append(row)
        lines += ["", f"Measured by `{metrics.get('command', '')}` on {metrics.get('machine', {}).get('cpu', '?')}"
                  f" at {metrics.get('time', '?')}.", ""]
    lines += ["## Files", "", f"{len(manifest['files'])} files, content hash `{manifest['content_hash']}`;",
              "verify with `python -m compress.inspect PATH`.", ""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _default_load(manifest: dict[str, Any]) -> str:
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def write_artifact(out: str | Path, kind: str, step: str, config: dict[str, Any], *,
                   parent: Artifact | None = None, overwrite: bool = False,
                   extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temp dir to fill; on success add manifest + card and rename it to `out`.

    On any exception the temp dir is removed and `out` is untouched.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output already exists: {out} (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        yield tmp
        files = list_files(tmp)
        manifest: dict[str, Any] = {
            "format": "shrinkwrap-artifact",
            "format_version": FORMAT_VERSION,
            "name": out.name,
            "kind": kind,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "parent": None if parent is None else {
                "path": str(parent.path.resolve()), "kind": parent.kind, "content_hash": parent.content_hash},
            "step": {"name": step, "config": config, "command": command_line(step)},
            "libraries": library_versions(),
            "machine": machine_description(),
            **(extra or {}),
            "files": files,
            "content_hash": content_hash(files),
            "metrics": {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        parent_metrics = parent.metrics if parent is not None else None
        (tmp / CARD).write_text(render_card(manifest, parent_metrics), encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def record_metrics(artifact: Artifact, values: dict[str, Any], command: str) -> None:
    """Store measured metrics in the manifest and regenerate the card (both replaced atomically)."""
    manifest = dict(artifact.manifest)
    manifest["metrics"] = {
        "values": values,
        "command": command,
        "machine": machine_description(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    parent_metrics = None
    if artifact.parent_path is not None:
        with contextlib.suppress(UserError):
            parent_metrics = open_artifact(artifact.parent_path).metrics
    _atomic_write_text(artifact.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _atomic_write_text(artifact.path / CARD, render_card(manifest, parent_metrics))
    artifact.manifest = manifest
