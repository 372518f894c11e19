"""Load an artifact's model for serving: plain HF weights, or our GPTQ / INT8 layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError


def model_dir(path: str | Path) -> Path:
    """The path, if it holds a model (config.json); else a one-line error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (not a model artifact)")
    return path


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """A model folder's config.json; missing or unreadable is a one-line error naming the file."""
    return _read_json(model_dir(path) / "config.json")


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """An artifact's shrinkwrap.json (None for a plain model folder); unreadable is a one-line error."""
    manifest = Path(path) / "shrinkwrap.json"
    return _read_json(manifest) if manifest.is_file() else None


def check_draft_target(draft_path: str | Path, target_path: str | Path, force: bool) -> None:
    """Refuse (one line) a `draft` artifact (`python -m compress.draft`) made for another target, unless
    `force`: its acceptance, and the layers it shares, are the target's it was made from."""
    draft = read_manifest(draft_path)
    if draft is None or draft.get("kind") != "draft" or force:
        return
    target = read_manifest(target_path) or {}
    made = draft.get("draft", {})
    if made.get("target_content_hash") != target.get("content_hash"):
        raise UserError(f"draft: {draft_path} was made for target {made.get('target')} (content "
                        f"{str(made.get('target_content_hash'))[:16]}…), not {target_path}; pass --force to use it "
                        "anyway")


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir(path))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable tokenizer file
        raise UserError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0][:200]})") from None


def is_onnx_export(path: str | Path, device: str | torch.device = "cpu") -> bool:
    """Whether the artifact is an ONNX export; those run on the CPU only (else a one-line error)."""
    from runtime.onnx_backend import is_onnx_artifact

    if not is_onnx_artifact(path):
        return False
    if torch.device(device).type != "cpu":
        raise UserError(f"{path}: an ONNX export runs on the CPU here (device {device} requested)")
    return True


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = model_dir(path)
    if is_onnx_export(path, device):
        from runtime.onnx_backend import OnnxCausalLM

        return OnnxCausalLM(path)
    config = read_config(path)
    if config.get("quantization_config") is not None:
        from runtime.quantized import load_quantized_model

        return load_quantized_model(path, device=device)
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or getattr(torch, stored))
    except Exception as exc:  # noqa: BLE001 - a corrupt weight file
        raise UserError(f"{path}: cannot load this model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                        ) from None
    return model.eval().to(device)


def open_engine(path: str | Path, device: str = "cpu", block_size: int = 16, num_blocks: int = 512) -> Any:
    """The engine for an artifact: ONNX Runtime for an `onnx` export, TensorRT-LLM's runner for a built engine
    directory, else the paged PyTorch engine."""
    from runtime.engine import Engine

    if is_onnx_export(path, device):
        from runtime.onnx_backend import OnnxEngine

        return OnnxEngine(path)
    from runtime.trtllm_backend import TrtllmEngine, is_trtllm_engine

    if is_trtllm_engine(path):
        return TrtllmEngine(path)
    return Engine(load_model(path, device), block_size, num_blocks)
