"""Load an artifact's model for serving: plain HF weights, or our GPTQ / INT8 layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime.errors import UserError


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json (not a model artifact)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})") from None
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
