"""The EAGLE head's training module learns the target's next feature and token, with and without unrolling."""

import pytest
import torch

from runtime.eagle import new_head
from tests.conftest import fit_on_one_batch, make_tiny_llama
from train.distillation import OptimConfig
from train.eagle import EagleModule


@pytest.mark.parametrize("unroll", [1, 3])
def test_head_learns_the_targets_next_token(unroll):
    torch.manual_seed(0)
    target = make_tiny_llama(vocab_size=128, hidden=64, layers=2, seed=3)
    module = EagleModule(new_head(target), target, OptimConfig(lr=3e-3, warmup_steps=2, max_steps=60), kl_weight=1.0,
                         unroll=unroll)
    before, after = fit_on_one_batch(module)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["top1"] > before["top1"] + 0.2
    assert not any(p.grad is not None for p in target.parameters())  # the target is never trained
    assert module.head.model.embed_tokens.weight.grad is None and module.head.lm_head.weight.grad is None
