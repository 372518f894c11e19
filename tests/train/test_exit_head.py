"""The exit head's training module learns the target's final distribution from layer L, never touching the target."""

import torch

from runtime.exit_head import new_exit_head
from tests.conftest import fit_on_one_batch, make_tiny_llama
from train.distillation import OptimConfig
from train.exit_head import ExitModule


def test_exit_learns_the_targets_next_token_from_layer_l():
    torch.manual_seed(0)
    target = make_tiny_llama(vocab_size=128, hidden=64, layers=4, seed=3)
    with torch.no_grad():  # layers after the exit that matter (a random tiny model's residual stream dominates)
        for layer in target.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(8)
            layer.mlp.down_proj.weight.mul_(8)
    module = ExitModule(new_exit_head(target, 1), target, OptimConfig(lr=3e-3, warmup_steps=2, max_steps=60),
                        kl_weight=1.0)
    before, after = fit_on_one_batch(module)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["top1"] > before["top1"] + 0.2
    assert not any(p.grad is not None for p in target.parameters())  # the target is never trained
