import pytest
import torch

from train.distillation import OptimConfig, warmup_cosine
from train.losses import forward_kl, hidden_mse, next_token_ce, reverse_kl


def test_kl_losses():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert forward_kl(t, t).item() == pytest.approx(0, abs=1e-6)
    assert reverse_kl(t, t).item() == pytest.approx(0, abs=1e-6)
    manual = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
    assert forward_kl(s, t).item() == pytest.approx(manual.item(), rel=1e-5)
    assert reverse_kl(s, t).item() != pytest.approx(forward_kl(s, t).item(), rel=1e-3)
    # T^2 scaling keeps the gradient magnitude comparable across temperatures
    assert forward_kl(s, t, temperature=4.0).item() > 0


def test_ce_and_hidden():
    logits = torch.zeros(1, 4, 7)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert next_token_ce(logits, ids).item() == pytest.approx(torch.log(torch.tensor(7.0)).item(), rel=1e-6)
    h = torch.randn(2, 3, 8)
    assert hidden_mse(h, h).item() == 0
    assert hidden_mse(10 * h, 10 * (h + 0.1)).item() == pytest.approx(hidden_mse(h, h + 0.1).item(), rel=1e-4)


def test_warmup_then_cosine():
    cfg = OptimConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert warmup_cosine(0, cfg) == pytest.approx(0.1)
    assert warmup_cosine(9, cfg) == pytest.approx(1.0)
    assert warmup_cosine(60, cfg) == pytest.approx(0.55)
    assert warmup_cosine(110, cfg) == pytest.approx(0.1)
