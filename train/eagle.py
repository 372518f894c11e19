"""The EAGLE head's LightningModule: a frozen target supplies features and distributions, the head learns both.

EAGLE's loss: the head's predicted feature regresses onto the target's next feature (smooth L1),
and the target's LM head applied to it matches the target's next distribution (forward KL). The
target stays outside the module's children (not trained, not wrapped, not checkpointed), as the
teacher in `train/distillation.py`.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from train.distillation import OptimConfig, warmup_cosine
from train.losses import forward_kl


class EagleModule(L.LightningModule):
    def __init__(self, head: torch.nn.Module, target: torch.nn.Module, optim: OptimConfig,
                 feature_weight: float = 1.0, kl_weight: float = 0.1, noise: float = 0.0,
                 gradient_checkpointing: bool = False, unroll: int = 1):
        super().__init__()
        self.head = head.train()
        self._target = [target.eval().requires_grad_(False)]
        self.optim, self.feature_weight, self.kl_weight, self.noise = optim, feature_weight, kl_weight, noise
        self.unroll = unroll
        if gradient_checkpointing:
            self.head.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._val = {"agree": 0.0, "count": 0.0}

    @property
    def student(self) -> torch.nn.Module:
        """The trained module, under the name `TrainingAudit` reads."""
        return self.head

    @property
    def target(self) -> torch.nn.Module:
        return self._target[0]

    def on_fit_start(self) -> None:
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._target[0] = self.target.to(device=self.device, dtype=dtype)

    on_validation_start = on_fit_start

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Entry i reads the target's feature at i and token i + 1; it predicts the feature at i + 1.

        With `unroll` s > 1, the head's predictions are fed back s - 1 times (step j reads the features
        step j - 1 predicted, and the tokens one further on), as its later draft tokens read its own
        features at inference (EAGLE-3's training-time test, without its attention mask: each step's
        entries see that step's earlier entries). Step j's losses are weighted 0.8^(j - 1).
        """
        with torch.no_grad():
            features = self.target.model(ids, use_cache=False).last_hidden_state
            target_logits = self.target.lm_head(features)
        length = ids.shape[1]
        inputs = features[:, :-1]
        totals = {"feature": 0.0, "kl": 0.0}
        weight_sum = 0.0
        for step in range(1, self.unroll + 1):
            if length - step < 1:
                break
            if self.noise and self.training:  # EAGLE's augmentation: drafted features are never exact
                inputs = inputs + (torch.rand_like(inputs) - 0.5) * (2 * self.noise)
            positions = torch.arange(step - 1, length - 1, device=ids.device)[None]
            predicted, _ = self.head(inputs, ids[:, step:], positions)
            logits = F.linear(predicted, self.target.lm_head.weight.to(predicted.dtype))
            weight = 0.8 ** (step - 1)
            totals["feature"] = totals["feature"] + weight * F.smooth_l1_loss(predicted.float(),
                                                                              features[:, step:].float())
            totals["kl"] = totals["kl"] + weight * forward_kl(logits, target_logits[:, step:])
            weight_sum += weight
            if step == 1:
                top1 = (logits.argmax(-1) == target_logits[:, 1:].argmax(-1)).float().mean().detach()
            inputs = predicted[:, :-1]  # step j + 1, entry i: the feature step j predicted for position i + j
        parts = {name: value / weight_sum for name, value in totals.items()}
        parts["loss"] = self.feature_weight * parts["feature"] + self.kl_weight * parts["kl"]
        parts["top1"] = top1
        return parts

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        parts = self.losses(batch)
        for k, v in parts.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "top1"), on_step=True)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return parts["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val = {"agree": 0.0, "count": 0.0}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        batch, weight = batch
        if float(weight) == 0:
            return
        top1 = self.losses(batch)["top1"]
        n = batch.shape[0] * (batch.shape[1] - 1)
        self._val["agree"] += float(top1) * n
        self._val["count"] += n

    def on_validation_epoch_end(self) -> None:
        if self._val["count"]:
            self.log("val/top1", self._val["agree"] / self._val["count"], prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, self.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
