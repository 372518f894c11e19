"""`python -m compress.distill`: train a smaller student of the same tokenizer from a teacher artifact.

Lightning does the loop (progress bar, CSV logs, checkpoints every N steps, `--resume`, gradient
accumulation and clipping, bf16-mixed on GPU, `--devices`/`--strategy` for DDP or FSDP). The
student is written as a `distilled` artifact only after training ends, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.artifact import Artifact, open_artifact, record_metrics, verify, write_artifact
from compress.evaluate import accuracy_metrics
from compress.models import count_parameters, describe_model, load_artifact_model, load_tokenizer
from compress.surgery import keep_layers
from core.config import field, parse_config
from core.data import heldout_windows
from core.errors import UserError, run_main
from core.family import require

INITS = ("layer-drop", "config", "artifact")


@dataclass
class DistillConfig:
    teacher: str = field("artifacts/reference", help="teacher artifact")
    out: str = field("artifacts/distilled", help="output artifact directory")
    init: str = field("layer-drop", help="student initialisation", choices=INITS)
    student_layers: int = field(15, help="layer-drop: number of teacher layers to keep (evenly spaced)")
    keep_layers: list[int] = field([], help="layer-drop: explicit teacher layer indices to keep")
    student_config: dict | None = field(None, help="init=config: overrides of the teacher's config (YAML mapping)")
    student: str | None = field(None, help="init=artifact: start from this artifact (e.g. a pruned model)")
    data: str | None = field(None, help="training text file (default: corpus train split)")
    text_field: str = field("text", help="text field for JSONL/Parquet data")
    seq_len: int = field(512, help="tokens per training block")
    batch_size: int = field(4, help="blocks per micro-batch (per device)")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    max_steps: int = field(200, help="optimizer steps")
    max_minutes: float | None = field(None, help="stop training after this many minutes (then write the artifact)")
    lr: float = field(2e-4, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(20, help="linear warm-up steps before cosine decay")
    grad_clip: float = field(1.0, help="gradient norm clip (0 disables)")
    kd_weight: float = field(1.0, help="weight of forward KL(teacher || student)")
    reverse_kd_weight: float = field(0.0, help="weight of reverse KL (MiniLLM-style)")
    ce_weight: float = field(0.0, help="weight of cross-entropy on the data")
    hidden_weight: float = field(0.0, help="weight of hidden-state MSE on mapped layers (layer-drop only)")
    temperature: float = field(1.0, help="KD temperature (losses scaled by T^2)")
    seq_kd: bool = field(False, help="add teacher-generated continuations of training prompts (cached)")
    seq_kd_tokens: int = field(448, help="tokens the teacher generates per prompt for sequence-level KD")
    seq_kd_samples: int = field(1, help="continuations per prompt (1: greedy, more: sampled at T=1)")
    seq_kd_batch: int = field(8, help="prompts per teacher.generate call")
    gradient_checkpointing: bool = field(True, help="recompute student activations in backward")
    accelerator: str = field("auto", help="Lightning accelerator (auto, cpu, gpu)")
    devices: int = field(1, help="devices for the Lightning Trainer")
    strategy: str = field("auto", help="Lightning strategy (auto, ddp, fsdp)")
    precision: str | None = field(None, help="Lightning precision (default: bf16-mixed on GPU, 32-true on CPU)")
    val_every: int = field(50, help="validate every N optimizer steps")
    val_windows: int = field(8, help="held-out 512-token windows used for validation")
    eval_windows: int = field(48, help="held-out windows for the final before/after measurement")
    ckpt_every: int = field(50, help="checkpoint every N optimizer steps")
    work_dir: str | None = field(None, help="checkpoints and logs (default: <out>.work)")
    resume: bool = field(False, help="continue from the last checkpoint in work_dir")
    seed: int = field(0, help="random seed")
    overwrite: bool = field(False, help="replace an existing artifact at --out")

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "val_every", "ckpt_every", "devices",
                     "val_windows", "eval_windows"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise UserError("lr and temperature must be positive")
        weights = (self.kd_weight, self.reverse_kd_weight, self.ce_weight, self.hidden_weight)
        if any(w < 0 for w in weights) or not any(weights):
            raise UserError("loss weights must be >= 0 and at least one positive")
        if self.init == "config" and not self.student_config:
            raise UserError("student_config: required with init=config")
        if self.init == "artifact" and not self.student:
            raise UserError("student: required with init=artifact")
        if self.strategy not in ("auto", "ddp", "fsdp", "ddp_spawn", "ddp_find_unused_parameters_true"):
            raise UserError(f"strategy: unknown '{self.strategy}'")

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(self.out) + ".work")


def evenly_spaced_layers(total: int, keep: int) -> list[int]:
    """`keep` indices from 0..total-1, first and last included."""
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def kept_teacher_layers(cfg: DistillConfig, n_teacher: int) -> list[int]:
    """The teacher layers a layer-drop student keeps: explicit, or evenly spaced."""
    return sorted(cfg.keep_layers) if cfg.keep_layers else evenly_spaced_layers(n_teacher, cfg.student_layers)


def build_student(cfg: DistillConfig, teacher: torch.nn.Module, teacher_artifact: Artifact) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    n_teacher = teacher.config.num_hidden_layers
    if cfg.init == "layer-drop":
        keep = kept_teacher_layers(cfg, n_teacher)
        if not keep or keep[-1] >= n_teacher or keep[0] < 0 or len(set(keep)) != len(keep):
            raise UserError(f"keep_layers: indices must be distinct and within 0..{n_teacher - 1}")
        if len(keep) >= n_teacher:
            raise UserError(f"student_layers: the student must be smaller than the teacher ({n_teacher} layers)")
        return keep_layers(teacher, keep)
    if cfg.init == "config":
        merged = {**teacher.config.to_dict(), **cfg.student_config}
        if merged.get("vocab_size") != teacher.config.vocab_size:
            raise UserError(f"student_config: vocab_size {merged.get('vocab_size')} differs from the teacher's "
                            f"{teacher.config.vocab_size} (the student must share the tokenizer)")
        config = teacher.config.__class__.from_dict(merged)
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student_artifact = open_artifact(cfg.student)
    ours = (Path(cfg.student) / "tokenizer.json").read_bytes() if (Path(cfg.student) / "tokenizer.json").is_file() else b""
    theirs = (teacher_artifact.path / "tokenizer.json").read_bytes()
    if ours != theirs:
        raise UserError(f"student: {cfg.student} does not use the teacher's tokenizer (tokenizer.json differs)")
    return load_artifact_model(student_artifact.path)


def _check_sizes(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    s, t = count_parameters(student), count_parameters(teacher)
    if s >= t:
        raise UserError(f"the student ({s:,} parameters) is not smaller than the teacher ({t:,})")


def lightning_trainer(cfg: DistillConfig):
    """The Trainer of every training step (distill, prune recovery, drafts): checkpoints, resume, logs."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from train.distillation import TrainingAudit

    gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    precision = cfg.precision or ("bf16-mixed" if gpu else "32-true")
    ckpt = ModelCheckpoint(dirpath=cfg.work_path / "checkpoints", every_n_train_steps=cfg.ckpt_every,
                           save_last=True, save_top_k=-1, filename="step{step}", auto_insert_metric_name=False)
    import datetime as dt

    max_time = dt.timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None
    return L.Trainer(max_steps=cfg.max_steps, max_time=max_time, accelerator=cfg.accelerator, devices=cfg.devices,
                     strategy=cfg.strategy, precision=precision, accumulate_grad_batches=cfg.grad_accum,
                     gradient_clip_val=cfg.grad_clip or None, val_check_interval=cfg.val_every * cfg.grad_accum,
                     check_val_every_n_epoch=None, num_sanity_val_steps=0,
                     callbacks=[ckpt, TrainingAudit(str(cfg.work_path / "audit"))],
                     logger=CSVLogger(cfg.work_path, name="logs"), default_root_dir=cfg.work_path,
                     log_every_n_steps=1, enable_model_summary=False, use_distributed_sampler=False)


def distill(cfg: DistillConfig, kind: str = "distilled", param_masks: dict[str, torch.Tensor] | None = None,
            extra: dict[str, Any] | None = None) -> Artifact | None:
    """Train the student; write and return the artifact (None on non-zero ranks).

    `param_masks` (parameter name -> keep mask) hold pruned weights at zero: pruning recovery.
    """
    import lightning as L

    from train.datamodule import DistillDataModule, teacher_continuations
    from train.distillation import DistillationModule, LossWeights, OptimConfig

    teacher_artifact = open_artifact(cfg.teacher)
    if problems := verify(teacher_artifact):
        raise UserError(f"refusing to use a damaged teacher: {problems[0]}")
    if cfg.init == "layer-drop":  # a config-initialised student is any architecture transformers builds
        require(teacher_artifact.hf_config, "distill")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise UserError(f"output already exists: {cfg.out} (pass --overwrite to replace it)")
    last = cfg.work_path / "checkpoints" / "last.ckpt"
    if cfg.resume and not last.is_file():
        raise UserError(f"resume: no checkpoint at {last}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(teacher_artifact.path)
    teacher = load_artifact_model(teacher_artifact.path)
    student = build_student(cfg, teacher, teacher_artifact)
    if param_masks is None:  # a sparse student keeps its shape: its zeros are the saving
        _check_sizes(student, teacher)
    hidden_map: list[tuple[int, int]] = []
    if cfg.hidden_weight > 0:
        if cfg.init != "layer-drop":
            raise UserError("hidden_weight: hidden-state loss needs init=layer-drop (matching widths)")
        hidden_map = list(enumerate(kept_teacher_layers(cfg, teacher.config.num_hidden_layers)))

    seq_kd_sequences = None
    if cfg.seq_kd:
        from core.data import load_split_or_file

        device = "cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu"
        generator = teacher.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        seq_kd_sequences = teacher_continuations(
            generator, tokenizer, load_split_or_file(cfg.data, "train", cfg.text_field),
            cfg.seq_len - cfg.seq_kd_tokens, cfg.seq_kd_tokens, cfg.work_path, teacher_artifact.content_hash,
            cfg.seq_kd_samples, cfg.seq_kd_batch, cfg.seed)
        teacher = teacher.to(device="cpu", dtype=torch.float32)
    data = DistillDataModule(tokenizer, cfg.seq_len, cfg.batch_size, cfg.data, cfg.text_field, cfg.val_windows,
                             seq_kd_sequences, cfg.seed, cfg.grad_accum)
    module = DistillationModule(
        student, teacher,
        LossWeights(cfg.kd_weight, cfg.reverse_kd_weight, cfg.ce_weight, cfg.hidden_weight, cfg.temperature,
                    hidden_map),
        OptimConfig(cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_steps),
        cfg.gradient_checkpointing, param_masks)
    windows = heldout_windows(tokenizer)[: cfg.eval_windows]
    trainer = lightning_trainer(cfg)
    before = accuracy_metrics(teacher, {"student": student}, windows) if trainer.is_global_zero else None
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if cfg.resume else None)
    train_seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    student = module.student.float().cpu().eval()
    student.gradient_checkpointing_disable()
    student.config.use_cache = True
    teacher = teacher.float().cpu()
    after = accuracy_metrics(teacher, {"student": student}, windows)
    tokens = trainer.global_step * cfg.batch_size * cfg.grad_accum * cfg.seq_len * trainer.world_size
    info = {"steps": trainer.global_step, "train_tokens": tokens, "train_seconds": round(train_seconds, 1),
            "train_tokens_per_s": tokens / max(train_seconds, 1e-9), "world_size": trainer.world_size,
            "before": _summary(before), "after": _summary(after),
            "eval_windows": int(windows.shape[0]), "work_dir": str(cfg.work_path)}
    with write_artifact(cfg.out, kind, "compress.distill", jsonable(cfg), parent=teacher_artifact,
                        overwrite=cfg.overwrite,
                        extra={**(extra or {}), "model": describe_model(student), "distillation": info,
                               "description": f"Student distilled from `{teacher_artifact.path.name}` "
                                              f"({cfg.init}, {trainer.global_step} steps)."}) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    artifact = open_artifact(cfg.out)
    values = {**after["student"], "reference_perplexity": after["__reference__"]["perplexity"],
              "init_perplexity": before["student"]["perplexity"], "init_kl": before["student"]["kl"],
              "parameters": count_parameters(student)}
    record_metrics(artifact, values, "compress.distill (final held-out measurement)")
    return artifact


def _summary(acc: dict[str, Any]) -> dict[str, float]:
    return {"teacher_perplexity": acc["__reference__"]["perplexity"], **acc["student"]}


def jsonable(cfg: Any) -> dict[str, Any]:
    """A step's config (a dataclass) as the manifest records it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(DistillConfig, argv, "python -m compress.distill", __doc__.splitlines()[0])
    artifact = distill(cfg)
    if artifact is not None:
        d = artifact.manifest["distillation"]
        print(f"distilled artifact: {artifact.path}: held-out perplexity {d['before']['perplexity']:.2f} -> "
              f"{d['after']['perplexity']:.2f} (teacher {d['after']['teacher_perplexity']:.2f}), "
              f"KL {d['before']['kl']:.3f} -> {d['after']['kl']:.3f}, {d['steps']} steps, {d['train_seconds']} s")


if __name__ == "__main__":
    run_main(main)
