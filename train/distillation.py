"""The distillation LightningModule: a frozen teacher, a trainable student, weighted KD losses.

The teacher is kept out of the module's children on purpose: it is not trained, not wrapped by
DDP/FSDP and not written into checkpoints (which hold the student and optimizer only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning as L
import torch

from train.losses import forward_kl, hidden_mse, next_token_ce, reverse_kl


@dataclass
class LossWeights:
    kd: float = 1.0  # forward KL(teacher || student)
    reverse_kd: float = 0.0  # reverse KL(student || teacher), MiniLLM-style
    ce: float = 0.0  # cross-entropy on the data
    hidden: float = 0.0  # hidden-state MSE on mapped layers
    temperature: float = 1.0
    hidden_map: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 100
    min_lr_ratio: float = 0.1


def warmup_cosine(step: int, cfg: OptimConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / max(1, cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DistillationModule(L.LightningModule):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, weights: LossWeights,
                 optim: OptimConfig, gradient_checkpointing: bool = True,
                 param_masks: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self._masks = param_masks or {}
        self.student = student.train()
        self._teacher = [teacher.eval().requires_grad_(False)]  # a list hides it from nn.Module
        self.weights, self.optim = weights, optim
        self.student.config.use_cache = False
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val: dict[str, float] = {}

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._teacher[0] = self.teacher.to(device=self.device, dtype=dtype)

    on_validation_start = on_fit_start

    def on_after_backward(self) -> None:
        """Pruned weights get no gradient (and AdamW without decay then never moves them)."""
        params = dict(self.student.named_parameters())
        for name, mask in self._masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask.to(grad.device, grad.dtype))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._masks:
            params = dict(self.student.named_parameters())
            with torch.no_grad():
                for name, mask in self._masks.items():
                    params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        w = self.weights
        want_hidden = w.hidden > 0 and bool(w.hidden_map)
        with torch.no_grad():
            t_out = self.teacher(ids, output_hidden_states=want_hidden, use_cache=False)
        s_out = self.student(ids, output_hidden_states=want_hidden, use_cache=False)
        s_logits, t_logits = s_out.logits, t_out.logits
        parts: dict[str, torch.Tensor] = {}
        if w.kd:
            parts["kd"] = forward_kl(s_logits, t_logits, w.temperature)
        if w.reverse_kd:
            parts["reverse_kd"] = reverse_kl(s_logits, t_logits, w.temperature)
        if w.ce:
            parts["ce"] = next_token_ce(s_logits, ids)
        if want_hidden:
            # hidden_states[0] is the embedding output, so layer i's output is index i + 1
            parts["hidden"] = torch.stack([hidden_mse(s_out.hidden_states[s + 1], t_out.hidden_states[t + 1])
                                           for s, t in w.hidden_map]).mean()
        weight_of = {"kd": w.kd, "reverse_kd": w.reverse_kd, "ce": w.ce, "hidden": w.hidden}
        parts["loss"] = sum(weight_of[k] * v for k, v in parts.items())
        return parts

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        for k, v in parts.items():
            self.log(f"train/{k}", v, prog_bar=k == "loss", on_step=True, sync_dist=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return parts["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val = {"nll": 0.0, "kl": 0.0, "count": 0.0}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        batch, weight = batch
        if float(weight) == 0:  # a placeholder on a rank with fewer windows than the others
            return
        s_logits = self.student(batch, use_cache=False).logits[:, :-1].float()
        t_logits = self.teacher(batch, use_cache=False).logits[:, :-1].float()
        s_logp, t_logp = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
        targets = batch[:, 1:]
        self._val["nll"] += -s_logp.gather(-1, targets[..., None]).sum().item()
        self._val["kl"] += (t_logp.exp() * (t_logp - s_logp)).sum().item()
        self._val["count"] += targets.numel()

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor([self._val["nll"], self._val["kl"], self._val["count"]], device=self.device,
                              dtype=torch.float64)
        totals = self.all_gather(totals).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else totals
        if totals[2] > 0:
            self.log("val/perplexity", math.exp(totals[0] / totals[2]), prog_bar=True, rank_zero_only=True)
            self.log("val/kl", float(totals[1] / totals[2]), prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.student.parameters(), lr=self.optim.lr, weight_decay=self.optim.weight_decay,
                                betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, self.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TrainingAudit(L.Callback):
    """Per rank, the fingerprints of the batches it trained on and of its final weights.

    Written to <dir>/rank<N>.json, so a multi-process run can be checked: ranks must see different
    data and end with identical weights.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.batches: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        self.batches.append(hashlib.sha1(batch.detach().cpu().numpy().tobytes()).hexdigest()[:16])

    def on_train_end(self, trainer, pl_module) -> None:
        import hashlib
        import json
        import os
        from pathlib import Path

        digest = hashlib.sha256()
        for name, p in sorted(pl_module.student.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
        out = Path(self.directory)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size,
                                   "batches": self.batches, "weights_sha256": digest.hexdigest(),
                                   "pid": os.getpid()}))
        tmp.replace(path)
