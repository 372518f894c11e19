"""`python -m compress.prune`: structured pruning that shrinks the model, or unstructured / N:M sparsity.

Structured methods (`layers`, `heads`, `mlp`) rank parts by importance on calibration data and cut
them out, giving a smaller standard HF model. Unstructured methods (`magnitude`, `wanda`,
`sparsegpt`) zero weights in place. `--recover` then distills from the unpruned parent (the same
LightningModule as `compress.distill`), keeping pruned weights at zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.artifact import Artifact, open_artifact, verify, write_artifact
from compress.calibration import CalibrationFlags, LayerBatch, calibrate, calibration_windows
from compress.models import count_parameters, describe_model, load_artifact_model, load_tokenizer
from compress.sparsity import magnitude_mask, sparsegpt, wanda_mask
from compress.surgery import keep_kv_groups, keep_layers, keep_mlp_channels
from core.config import field, parse_config
from core.errors import UserError, run_main
from core.family import Family, head_dim, kv_heads, layer_prefix, require

STRUCTURED = ("layers", "heads", "mlp")
UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")


@dataclass
class PruneConfig(CalibrationFlags):
    artifact: str = field("artifacts/reference", help="artifact to prune")
    out: str = field(None, help="output artifact directory")
    method: str = field("wanda", help="pruning method", choices=STRUCTURED + UNSTRUCTURED)
    sparsity: float | None = field(None, help="fraction to remove: weights, layers, KV heads or MLP channels")
    pattern: str | None = field(None, help="N:M semi-structured pattern for unstructured methods, e.g. 2:4")
    target_layers: int | None = field(None, help="layers: number of decoder layers to keep")
    target_intermediate: int | None = field(None, help="mlp: MLP channels to keep per layer")
    target_kv_heads: int | None = field(None, help="heads: KV heads to keep per layer")
    n_samples: int = field(64, help="calibration windows")
    damp: float = field(0.01, help="SparseGPT damping")
    recover: bool = field(False, help="distill from the unpruned parent after pruning")
    max_steps: int = field(100, help="recovery: optimizer steps")
    teacher: str | None = field(None, help="recovery: teacher artifact (default: the artifact being pruned)")
    recover_config: str | None = field(None, help="recovery: a compress.distill YAML for the other settings")
    overwrite: bool = field(False, help="replace an existing artifact at --out")

    def validate(self) -> None:
        if not self.out:
            raise UserError("out: required (the output artifact directory)")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise UserError(f"sparsity: must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            if self.method not in UNSTRUCTURED:
                raise UserError(f"pattern: only for {', '.join(UNSTRUCTURED)}")
            n, m = self.nm
            if not 0 < n < m:
                raise UserError(f"pattern: need 0 < N < M, got {self.pattern}")
        targets = {"layers": self.target_layers, "mlp": self.target_intermediate, "heads": self.target_kv_heads}
        if self.method in UNSTRUCTURED and self.sparsity is None and self.pattern is None:
            raise UserError("sparsity: give --sparsity S or --pattern N:M")
        if self.method in STRUCTURED and self.sparsity is None and targets[self.method] is None:
            raise UserError(f"sparsity: give --sparsity S or an absolute target for method {self.method}")
        if self.max_steps < 1:
            raise UserError(f"max_steps: must be positive, got {self.max_steps}")
        self.validate_calibration()

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        try:
            n, m = (int(x) for x in self.pattern.split(":"))
        except ValueError:
            raise UserError(f"pattern: expected N:M such as 2:4, got {self.pattern!r}") from None
        return n, m


def _target(total: int, sparsity: float | None, absolute: int | None, what: str) -> int:
    keep = absolute if absolute is not None else total - int(round(total * sparsity))
    if keep < 1:
        raise UserError(f"cannot remove all {what} ({total}): keep at least one")
    if keep > total:
        raise UserError(f"target of {keep} {what} is more than the model has ({total})")
    return keep


@torch.no_grad()
def block_importance(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, family: Family) -> list[float]:
    """1 - mean cosine(input, output) per decoder layer: how much each block changes its stream."""
    scores: list[float] = []

    def on_layer(_index: int, inputs: list[LayerBatch], outputs: list[LayerBatch]) -> None:
        cos = torch.cat([torch.nn.functional.cosine_similarity(a.hidden, b.hidden, dim=-1).flatten()
                         for a, b in zip(inputs, outputs, strict=True)])
        scores.append(float(1 - cos.mean()))

    calibrate(model, windows, family, lambda *_: None, batch_size=batch_size, stats=None, groups=[],
              on_layer=on_layer, desc="block importance")
    return scores


@torch.no_grad()
def channel_stats(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, name: str, family: Family
                  ) -> list[torch.Tensor]:
    """Per layer, the sum of squares of each input channel of Linear `name` on the unpruned model."""
    stats: list[torch.Tensor] = []
    calibrate(model, windows, family, lambda _i, _layer, _names, found: stats.append(found[name]["sq"].cpu()),
              batch_size=batch_size, stats="sq", groups=[(name,)], desc="activation statistics")
    return stats


def prune_structured(model: torch.nn.Module, cfg: PruneConfig, windows: torch.Tensor, family: Family
                     ) -> tuple[torch.nn.Module, dict]:
    c = model.config
    if cfg.method == "layers":
        keep_n = _target(c.num_hidden_layers, cfg.sparsity, cfg.target_layers, "layers")
        scores = block_importance(model, windows, cfg.batch_size, family)
        keep = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep_n])
        return keep_layers(model, keep), {"block_importance": scores, "kept_layers": keep}
    if cfg.method == "mlp":
        keep_n = _target(c.intermediate_size, cfg.sparsity, cfg.target_intermediate, "MLP channels")
        stats = channel_stats(model, windows, cfg.batch_size, family.down_proj, family)
        keep = [s.topk(keep_n).indices for s in stats]
        return keep_mlp_channels(model, keep, family), {"intermediate_size": keep_n,
                                                        "kept_mlp_channels": [k.sort().values.tolist() for k in keep]}
    keep_n = _target(kv_heads(c), cfg.sparsity, cfg.target_kv_heads, "KV heads")
    per_group = c.num_attention_heads // kv_heads(c)
    stats = channel_stats(model, windows, cfg.batch_size, family.out_proj, family)
    keep, scores = [], []
    for s in stats:
        per_head = s.view(c.num_attention_heads, head_dim(c)).sum(1)
        per_group_score = per_head.view(kv_heads(c), per_group).sum(1)
        scores.append(per_group_score.tolist())
        keep.append(per_group_score.topk(keep_n).indices.tolist())
    return keep_kv_groups(model, keep, family), {"kv_group_importance": scores, "kept_kv_heads": keep}


@torch.no_grad()
def prune_unstructured(model: torch.nn.Module, cfg: PruneConfig, windows: torch.Tensor | None, family: Family
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Zero weights in place; returns the keep-masks and the achieved sparsity per Linear."""
    masks: dict[str, torch.Tensor] = {}

    def on_group(index: int, layer: torch.nn.Module, names: tuple[str, ...], stats: dict) -> None:
        for name in names:
            w = layer.get_submodule(name).weight
            if cfg.method == "magnitude":
                keep = magnitude_mask(w, cfg.sparsity or 0.0, cfg.nm)
                new_w = w * keep
            elif cfg.method == "wanda":
                keep = wanda_mask(w, stats[name]["sq"], cfg.sparsity or 0.0, cfg.nm)
                new_w = w * keep
            else:
                new_w, keep = sparsegpt(w, stats[name]["hessian"], cfg.sparsity or 0.0, cfg.nm, cfg.damp)
            w.copy_(new_w.to(w.dtype))
            masks[f"{layer_prefix(index)}{name}.weight"] = keep.cpu()

    calibrate(model, windows if cfg.method != "magnitude" else None, family, on_group, batch_size=cfg.batch_size,
              stats="hessian" if cfg.method == "sparsegpt" else "sq", desc=f"{cfg.method} (layers)")
    achieved = {k[: -len(".weight")]: round(1 - m.float().mean().item(), 4) for k, m in masks.items()}
    return masks, achieved


def prune(parent: Artifact, cfg: PruneConfig) -> Artifact:
    """Prune `parent`; write and return the `pruned` artifact (recovered by distillation if asked)."""
    if problems := verify(parent):
        raise UserError(f"refusing to prune a damaged artifact: {problems[0]}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise UserError(f"output already exists: {cfg.out} (pass --overwrite to replace it)")
    hf = parent.hf_config
    if hf.get("quantization_config"):
        raise UserError(f"{parent.path}: prune the unquantized model, then quantize")
    family = require(hf, f"prune.{cfg.method}")
    tokenizer = load_tokenizer(parent.path)
    model = load_artifact_model(parent.path)
    windows, calibration = (None, None) if cfg.method == "magnitude" else calibration_windows(cfg, tokenizer)
    info: dict[str, Any] = {"method": cfg.method, "calibration": calibration,
                            "parameters_before": count_parameters(model)}
    masks = None
    if cfg.method in STRUCTURED:
        model, details = prune_structured(model, cfg, windows, family)
        info.update(details)
    else:
        masks, achieved = prune_unstructured(model, cfg, windows, family)
        info["sparsity_per_layer"] = achieved
        info["sparsity_overall"] = round(sum(1 - m.float().mean().item() for m in masks.values()) / len(masks), 4)
    info["parameters_after"] = count_parameters(model)
    info["shape"] = describe_model(model)

    target = Path(cfg.out) if not cfg.recover else Path(str(cfg.out) + ".work") / "unrecovered"
    with write_artifact(target, "pruned", "compress.prune", dataclasses.asdict(cfg), parent=parent,
                        overwrite=cfg.overwrite or cfg.recover,
                        extra={"model": describe_model(model), "pruning": info,
                               "description": f"{cfg.method} pruning of `{parent.path.name}`."}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if not cfg.recover:
        return open_artifact(target)
    return _recover(parent, cfg, open_artifact(target), masks, info)


def _recover(parent: Artifact, cfg: PruneConfig, pruned: Artifact, masks: dict[str, torch.Tensor] | None,
             info: dict[str, Any]) -> Artifact:
    from compress.distill import DistillConfig, distill
    from core.config import build_config, read_yaml

    values = read_yaml(cfg.recover_config) if cfg.recover_config else {}
    values.update(teacher=cfg.teacher or str(parent.path), out=cfg.out, init="artifact", student=str(pruned.path),
                  max_steps=cfg.max_steps, overwrite=cfg.overwrite,
                  work_dir=str(Path(str(cfg.out) + ".work") / "recovery"))
    values.setdefault("warmup_steps", max(1, cfg.max_steps // 10))
    dcfg = build_config(DistillConfig, values, cfg.recover_config or "recovery settings")
    return distill(dcfg, kind="pruned", param_masks=masks,
                   extra={"pruning": {**info, "recovered_from": str(pruned.path)}})


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(PruneConfig, argv, "python -m compress.prune", __doc__.splitlines()[0])
    artifact = prune(open_artifact(cfg.artifact), cfg)
    p = artifact.manifest["pruning"]
    extra = f", sparsity {p['sparsity_overall']:.1%}" if "sparsity_overall" in p else ""
    print(f"pruned artifact: {artifact.path}: {p['parameters_before']:,} -> {p['parameters_after']:,} "
          f"parameters{extra}")


if __name__ == "__main__":
    run_main(main)
