"""The exit head's LightningModule (`compress.draft --method exit-head`): layer L's state -> the target's last one.

The frozen target gives, for each position, its layer-L state (the draft's input: the target's own first
L layers), its final feature and its next-token distribution; the exit learns the feature (smooth L1,
after the target's final norm) and the distribution through the target's own LM head (forward KL).
Training, logging, validation and the optimizer are EAGLE's (`train/eagle.py`); only the losses differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.eagle import EagleModule
from train.losses import forward_kl


class ExitModule(EagleModule):
    """Built as `EagleModule(head, target, optim, feature_weight, kl_weight)`; noise, unrolling and gradient
    checkpointing do not apply to an exit."""

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = self.target.model(ids, use_cache=False, output_hidden_states=True)
            entry = out.hidden_states[self.head.exit_layer]  # the input of layer L: layers 0..L-1 applied
            features = out.last_hidden_state
            target_logits = self.target.lm_head(features)
        predicted = self.target.model.norm(self.head(entry))
        logits = F.linear(predicted, self.target.lm_head.weight.to(predicted.dtype))
        parts = {"feature": F.smooth_l1_loss(predicted.float(), features.float()),
                 "kl": forward_kl(logits, target_logits)}
        parts["loss"] = self.feature_weight * parts["feature"] + self.kl_weight * parts["kl"]
        parts["top1"] = (logits.argmax(-1) == target_logits.argmax(-1)).float().mean().detach()
        return parts
