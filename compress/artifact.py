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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from core.errors import UserError

MANIFEST = "shrinkwrap.json"
CARD = "README.md"
FORMAT_VERSION = 1
KINDS = ("reference", "distilled", "pruned", "quantized", "onnx", "tensorrt-llm", "draft")
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
        running = ".".join(Path(sys.argv[0]).with_suffix("").parts[-2:])  # package.module
        if running != module and running.split(".")[-1] == module.split(".")[-1]:
            running = module  # a launcher of the same name (e.g. a console script)
        cmd = "python -m " + shlex.join([running, *sys.argv[1:]])
        return cmd if running == module else f"{cmd} (its {module} step)"
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
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def model_size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"])

    @property
    def hf_config(self) -> dict[str, Any]:
        """The model's config.json (what the family checks read before any work)."""
        from runtime.loading import read_config

        return read_config(self.path)


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


def find_parent(artifact: Artifact, search: Sequence[Path] = ()) -> Artifact:
    """The parent by content hash: at the recorded path if it still holds that content, else an artifact
    with that content beside the child, beside the recorded path, or in `search` (a copied or pulled
    artifact keeps its lineage). UserError when none is found."""
    link = artifact.manifest["parent"]
    recorded = Path(link["path"])
    candidates = [recorded]
    for folder in (*search, artifact.path.resolve().parent, recorded.parent):
        if folder.is_dir():
            candidates += sorted(p for p in folder.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    for path in candidates:
        with contextlib.suppress(UserError, OSError):
            found = open_artifact(path)
            if found.content_hash == link["content_hash"] and found.path.resolve() != artifact.path.resolve():
                return found
    raise UserError(f"parent {link.get('name') or recorded.name} (content {link['content_hash'][:16]}…) "
                    "not found on this machine")


def lineage(artifact: Artifact, search: Sequence[Path] = ()) -> list[tuple[Artifact | None, dict[str, Any]]]:
    """The chain of parents, nearest first: (parent artifact or None if gone, the recorded link)."""
    chain = []
    current = artifact
    seen = {artifact.content_hash}
    while (link := current.manifest.get("parent")) is not None:
        try:
            parent = find_parent(current, search)
        except UserError:
            chain.append((None, link))
            break
        chain.append((parent, link))
        if parent.content_hash in seen:
            break
        seen.add(parent.content_hash)
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
        lines.append(f"- parent: {parent.get('name') or Path(parent['path']).name} ({parent['kind']}, content hash "
                     f"`{parent['content_hash'][:16]}…`)")
    lines += ["", "Step configuration:", "", "```json", json.dumps(manifest["step"]["config"], indent=2), "```", ""]
    lines += ["## How to load it", "", manifest.get("load_instructions", _default_load(manifest)), ""]
    metrics = manifest.get("metrics", {})
    if metrics and metrics.get("protocol"):
        p = metrics["protocol"]
        lines += [f"Accuracy protocol: {p.get('windows')} held-out windows x {p.get('seq_len')} tokens "
                  f"({p.get('tokens_scored')} scored tokens{', full protocol' if p.get('full') else ', a subset'}).", ""]
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


def load_snippet(manifest: dict[str, Any]) -> str:
    """Python that loads this artifact and greedily answers one chat prompt; `PATH` is the artifact's folder.
    Every kind's snippet is executed by tests/compress/test_artifact_cards.py."""
    kind = manifest["kind"]
    if kind == "tensorrt-llm":  # the engine is built on the target GPU; here: what the checkpoint is
        return ("import json, pathlib\n"
                "config = json.loads((pathlib.Path(PATH) / 'config.json').read_text())\n"
                "print(config['architecture'], config['dtype'], config['quantization']['quant_algo'], "
                "'tp', config['mapping']['tp_size'])")
    if kind == "onnx" and manifest.get("onnx", {}).get("kv_cache", "shared") != "concat":
        return ("import onnxruntime_genai as og  # pip install onnxruntime-genai\n"
                "model = og.Model(PATH)\ntokenizer = og.Tokenizer(model)\n"
                "prompt = tokenizer.apply_chat_template('[{\"role\": \"user\", \"content\": \"Hi\"}]', "
                "add_generation_prompt=True)\n"
                "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=64)\n"
                "generator = og.Generator(model, params)\ngenerator.append_tokens(tokenizer.encode(prompt))\n"
                "while not generator.is_done():\n    generator.generate_next_token()\n"
                "print(tokenizer.decode(generator.get_sequence(0)))")
    if kind in ("onnx", "quantized"):  # our loader: GPTQ (dequantized once), int8 dynamic, any ONNX export
        return ("from runtime.engine import SamplingParams  # pip install 'lm-shrinkwrap[runtime]'\n"
                "from runtime.loading import load_tokenizer, open_engine\n"
                "tokenizer = load_tokenizer(PATH)\nengine = open_engine(PATH)\n"
                "ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True,"
                " return_dict=True)['input_ids']\n"
                "(out,), _ = engine.generate([list(ids)], SamplingParams(max_new_tokens=32))\n"
                "print(tokenizer.decode(out, skip_special_tokens=True))")
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n"
            "ids = tokenizer.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True)\n"
            "out = model.generate(**ids, max_new_tokens=32, do_sample=False)\n"
            "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))")


_LOAD_NOTES = {
    "quantized": "GPTQ checkpoints are standard Hugging Face GPTQ folders: vLLM, TGI and `transformers` + "
                 "`optimum` + a GPTQ kernel package (GPTQModel) read them too; `shrinkwrap-int8-dynamic` ones only "
                 "Shrinkwrap's loader reads.",
    "tensorrt-llm": "A TensorRT-LLM 1.2.x checkpoint: `bash PATH/build.sh ENGINE_DIR` on a GPU machine with "
                    "`tensorrt-llm==1.2.1` builds the engine (GPTQ checkpoints run `convert.py` first); "
                    "`python -m runtime.generate --artifact ENGINE_DIR` runs it.",
    "onnx": "An onnxruntime-genai folder (`genai_config.json`); Shrinkwrap's runtime runs it too "
            "(`python -m runtime.generate --artifact PATH`).",
}


def _default_load(manifest: dict[str, Any]) -> str:
    note = _LOAD_NOTES.get(manifest["kind"])
    return "```python\n" + load_snippet(manifest) + "\n```" + (f"\n\n{note}" if note else "")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Files 0666 and folders 0777 less the umask (0644/0755 under 0022), like any model folder: temp
    files are created 0600 and would stay unreadable to other users of a shared disk."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def config_hash(config: dict[str, Any]) -> str:
    """A step's resolved config, hashed: what the pipeline compares to skip a step already done (flags
    that only say what to do with an existing output are left out)."""
    kept = {k: v for k, v in config.items() if k not in ("overwrite", "if_missing")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
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
            "parent": None if parent is None else {  # identity is the content hash; path and name are hints
                "path": str(parent.path.resolve()), "name": parent.path.name, "kind": parent.kind,
                "content_hash": parent.content_hash},
            "step": {"name": step, "config": config, "config_hash": config_hash(config), "command": command_line(step)},
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
        make_readable(tmp)
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


def record_metrics(artifact: Artifact, values: dict[str, Any], command: str,
                   protocol: dict[str, Any] | None = None, report: str | None = None) -> bool:
    """Add a measurement to the manifest's history and regenerate the card (both replaced atomically).

    `metrics` (what the card shows) is the newest full-protocol measurement; a subset run
    (`protocol["full"]` false) is kept in `metrics_history` but never replaces a full one.
    Returns whether `metrics` changed.
    """
    manifest = dict(artifact.manifest)
    entry = {"values": values, "command": command, "machine": machine_description(),
             "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "protocol": protocol or {"full": True},
             "report": report}
    current = manifest.get("metrics") or {}
    history = list(manifest.get("metrics_history") or ([current] if current else []))
    manifest["metrics_history"] = history + [entry]
    replace = entry["protocol"].get("full", True) or not current or not current.get("protocol", {}).get("full", True)
    if replace:
        manifest["metrics"] = entry
    parent_metrics = None
    if artifact.manifest.get("parent"):
        with contextlib.suppress(UserError):
            parent_metrics = find_parent(artifact).metrics
    _atomic_write_text(artifact.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _atomic_write_text(artifact.path / CARD, render_card(manifest, parent_metrics))
    artifact.manifest = manifest
    return replace
