"""`python -m compress.quantize`: GPTQ / RTN (INT4, INT8, GPTQ v1 checkpoint), dynamic INT8, fp16, bf16.

GPTQ runs true-sequential, layer by layer: each layer is calibrated on the outputs of the already
quantized layers before it. The result is a standard Hugging Face GPTQ checkpoint
(`quantization_config.quant_method = "gptq"`) that GPTQModel, vLLM and TGI read unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from compress.artifact import Artifact, open_artifact, verify, write_artifact
from compress.calibration import CalibrationFlags, calibrate, calibration_windows
from compress.gptq import QuantResult, QuantSpec, quantize_gptq, quantize_rtn
from compress.models import describe_model, load_artifact_model, load_tokenizer
from compress.smoothing import smooth_inputs, smoothed_inputs
from core.config import field, parse_config
from core.errors import UserError, run_main
from core.family import Family, layer_prefix, require
from runtime.quantized import SUPPORTED_BITS, pack_gptq, quantize_int8_weight, quantized_module_names

METHODS = ("gptq", "rtn", "dynamic-int8", "fp16", "bf16")


@dataclass
class QuantizeConfig(CalibrationFlags):
    artifact: str = field("artifacts/reference", help="artifact to quantize")
    out: str = field(None, help="output artifact directory")
    method: str = field("gptq", help="quantization method", choices=METHODS)
    bits: int = field(4, help="weight bits for gptq/rtn (4 or 8)")
    group_size: int = field(128, help="columns per quantization group: 32, 64, 128, ... or -1 (per-channel)")
    sym: bool = field(True, help="symmetric grid (--no-sym for asymmetric zero points)")
    desc_act: bool = field(True, help="GPTQ act-order: quantize columns by decreasing Hessian diagonal "
                           "(on by default, as in GPTQModel: on SmolLM2 it cuts the W4 perplexity loss about in half)")
    damp: float = field(0.01, help="GPTQ damping, fraction of the mean Hessian diagonal")
    true_sequential: bool = field(True, help="re-calibrate each group of Linears after the previous is quantized")
    smooth_alpha: float = field(0.5, help="dynamic-int8: SmoothQuant migration strength (0 disables smoothing)")
    device: str = field("cpu", help="where the working layer runs during calibration (cpu or cuda); the model stays on the CPU")
    save_dtype: str = field("float16", help="dtype for the unquantized tensors of gptq/rtn checkpoints",
                            choices=("float16", "bfloat16", "float32"))
    overwrite: bool = field(False, help="replace an existing artifact at --out")

    def validate(self) -> None:
        if not self.out:
            raise UserError("out: required (the output artifact directory)")
        if self.method in ("gptq", "rtn"):
            if self.bits not in SUPPORTED_BITS:
                raise UserError(f"bits: {self.bits} is not supported (GPTQ v1 packing here: 4 or 8)")
            gs = self.group_size
            if gs != -1 and (gs < 8 or gs & (gs - 1)):
                raise UserError(f"group_size: must be a power of two >= 8 or -1 (per-channel), got {gs}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("device: CUDA is not available on this machine")
        if not 0 <= self.smooth_alpha <= 1:
            raise UserError(f"smooth_alpha: must be in [0, 1], got {self.smooth_alpha}")
        if not 0 < self.damp < 1:
            raise UserError(f"damp: must be in (0, 1), got {self.damp}")
        self.validate_calibration()

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.desc_act, self.damp)


def _check_shapes(model: torch.nn.Module, names: list[str], bits: int) -> None:
    per = 32 // bits
    for name in names:
        m = model.get_submodule(name)
        if m.in_features % per or m.out_features % per:
            raise UserError(f"{name}: shape {m.out_features}x{m.in_features} cannot be packed at {bits} bits "
                            f"(both dims must be multiples of {per})")


@torch.no_grad()
def quantize_weights(model: torch.nn.Module, cfg: QuantizeConfig, windows: torch.Tensor | None, family: Family
                     ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
    """GPTQ (true-sequential over layers) or RTN; each layer is calibrated on the outputs of the already
    quantized layers before it (the model at home keeps its original weights: the result is the packed tensors).

    Returns each Linear's checkpoint tensors, packed as soon as the Linear is done (half a byte per
    4-bit weight), so what is kept grows with the output, not with int32 codes of the whole model."""
    spec = cfg.spec
    results: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, dict[str, float]] = {}

    def on_group(index: int, layer: torch.nn.Module, names: tuple[str, ...], stats: dict) -> None:
        for name in names:
            module = layer.get_submodule(name)
            result = (quantize_rtn(module.weight, spec) if cfg.method == "rtn"
                      else quantize_gptq(module.weight, stats[name].pop("hessian"), spec))  # freed inside
            original = module.weight.detach().float()
            result = QuantResult(result.q.cpu(), result.scales.cpu(), result.zeros.cpu(), result.g_idx.cpu(),
                                 result.loss)
            dq = result.dequantized().to(original.device)
            full_name = layer_prefix(index) + name
            errors[full_name] = {"weight_rel_err": float((dq - original).norm() / original.norm()),
                                 "gptq_loss": result.loss}
            module.weight.copy_(dq.to(module.weight.dtype))
            results[full_name] = pack_gptq(result.q, result.scales, result.zeros, result.g_idx, cfg.bits)

    # the quantized Linears live on as packed tensors, so the model at home keeps its original weights
    calibrate(model, windows if cfg.method == "gptq" else None, family, on_group, batch_size=cfg.batch_size,
              device=cfg.device, true_sequential=cfg.true_sequential, desc=f"{cfg.method} (layers)",
              keep_changes=False)
    return results, errors


@torch.no_grad()
def smooth(model: torch.nn.Module, windows: torch.Tensor, cfg: QuantizeConfig, family: Family) -> None:
    """SmoothQuant each decoder layer from its input absmax on the calibration windows."""
    def on_group(_index: int, layer: torch.nn.Module, names: tuple[str, ...], stats: dict) -> None:
        smooth_inputs(layer, family, names[0], stats[names[0]]["absmax"], cfg.smooth_alpha)

    calibrate(model, windows, family, on_group, batch_size=cfg.batch_size, device=cfg.device, stats="sq",
              groups=[(name,) for name in smoothed_inputs(family)], desc="smoothing (layers)")


def _kept_tensors(model: torch.nn.Module, quantized: set[str] | dict, dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:
    """The model's tensors a quantized checkpoint keeps as they are: all but the quantized Linears' weights
    (their biases stay, as GPTQ has them) and a tied LM head."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(".weight") and key[:-len(".weight")] in quantized or (
                key == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        state[key] = tensor.detach().to(dtype or tensor.dtype).contiguous()
    return state


def _gptq_state_dict(model: torch.nn.Module, packed: dict[str, dict[str, torch.Tensor]],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = _kept_tensors(model, packed, dtype)
    for name, tensors in packed.items():
        for suffix, tensor in tensors.items():
            state[f"{name}.{suffix}"] = tensor
    return state


def _int8_state_dict(model: torch.nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    state, errors = _kept_tensors(model, set(names)), {}
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        q, scale = quantize_int8_weight(w)
        state[f"{name}.weight_int8"], state[f"{name}.weight_scale"] = q, scale
        errors[name] = {"weight_rel_err": float((q.float() * scale[:, None] - w).norm() / w.norm())}
    return state, errors


def quantize(parent: Artifact, cfg: QuantizeConfig) -> Artifact:
    """Quantize `parent` by `cfg.method`; write and return the `quantized` artifact."""
    problems = verify(parent)
    if problems:
        raise UserError(f"refusing to quantize a damaged artifact: {problems[0]}")
    hf = parent.hf_config
    if hf.get("quantization_config"):
        raise UserError(f"{parent.path}: already quantized; quantize the unquantized parent instead")
    family = require(hf, f"quantize.{cfg.method}")
    tokenizer = load_tokenizer(parent.path)
    needs_data = cfg.method == "gptq" or (cfg.method == "dynamic-int8" and cfg.smooth_alpha > 0)
    windows, calibration = calibration_windows(cfg, tokenizer) if needs_data else (None, None)
    # the model stays on the CPU in its stored dtype; `calibrate` brings one layer at a time to cfg.device
    model = load_artifact_model(parent.path)
    names = quantized_module_names(model, {})
    start = time.perf_counter()
    info: dict[str, Any] = {"method": cfg.method}
    config_dict = model.config.to_dict()

    if cfg.method in ("gptq", "rtn"):
        _check_shapes(model, names, cfg.bits)
        if calibration is not None:
            info["calibration"] = calibration
        results, errors = quantize_weights(model, cfg, windows, family)
        dtype = getattr(torch, cfg.save_dtype)
        state = _gptq_state_dict(model, results, dtype)
        config_dict["dtype"] = cfg.save_dtype
        config_dict["quantization_config"] = {
            "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act,
            "sym": cfg.sym, "damp_percent": cfg.damp, "true_sequential": cfg.true_sequential,
            "static_groups": False, "checkpoint_format": "gptq", "pack_dtype": "int32",
            "modules_to_not_convert": ["lm_head"], "meta": {"quantizer": ["lm-shrinkwrap:0.1.0"],
                                                            "method": cfg.method}}
    elif cfg.method == "dynamic-int8":
        if windows is not None:
            smooth(model, windows, cfg, family)
            info["calibration"] = calibration
            info["smoothing"] = {"alpha": cfg.smooth_alpha, "method": "SmoothQuant, folded into norms / up_proj"}
        state, errors = _int8_state_dict(model, names)
        config_dict["quantization_config"] = {"quant_method": "shrinkwrap-int8-dynamic", "weights": "int8 per-channel",
                                              "activations": "int8 per-token dynamic", "symmetric": True,
                                              "modules_to_not_convert": ["lm_head"]}
    else:
        dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[cfg.method])
        model = model.to(device="cpu", dtype=dtype)
        state, errors = None, {}
    info["wall_seconds"] = round(time.perf_counter() - start, 1)
    info["layer_errors"] = errors

    description = f"{cfg.method} of `{parent.path.name}`" + (
        f", W{cfg.bits} group {cfg.group_size} {'sym' if cfg.sym else 'asym'}"
        f"{' desc_act' if cfg.desc_act else ''}" if cfg.method in ("gptq", "rtn") else "")
    with write_artifact(cfg.out, "quantized", "compress.quantize", dataclasses.asdict(cfg), parent=parent,
                        overwrite=cfg.overwrite,
                        extra={"model": {**describe_model(model), "quantization": cfg.method},
                               "quantization": info, "description": description}) as tmp:
        if state is None:
            model.save_pretrained(tmp)
        else:
            _save_checkpoint(tmp, config_dict, state, model)
        tokenizer.save_pretrained(tmp)
    return open_artifact(cfg.out)


def _save_checkpoint(tmp: Path, config_dict: dict[str, Any], state: dict[str, torch.Tensor],
                     model: torch.nn.Module) -> None:
    import json

    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n", encoding="utf-8")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(QuantizeConfig, argv, "python -m compress.quantize", __doc__.splitlines()[0])
    artifact = quantize(open_artifact(cfg.artifact), cfg)
    q = artifact.manifest["quantization"]
    print(f"quantized artifact: {artifact.path} ({artifact.model_size_bytes() / 1e6:.0f} MB, "
          f"{q['method']}, {q['wall_seconds']} s)")


if __name__ == "__main__":
    run_main(main)
