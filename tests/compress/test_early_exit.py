"""Lossy early exit's curve: teacher-forced accuracy per threshold, whose ends are the target and the exit model."""

import pytest
import torch

from compress.early_exit import exit_accuracy, markdown
from compress.evaluate import accuracy_metrics
from tests.conftest import make_tiny_llama


def test_curve_runs_from_the_target_alone_to_the_exit_model_alone():
    target, exit_model = make_tiny_llama(layers=2, seed=1).eval(), make_tiny_llama(layers=1, seed=2).eval()
    windows = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    full = accuracy_metrics(target, {"exit": exit_model}, windows)
    with torch.no_grad():
        confidence = torch.softmax(exit_model(windows).logits[:, :-1], -1).max(-1).values.flatten()
    never, middle, always = exit_accuracy(target, lambda ids: exit_model(ids).logits, windows,
                                          [1.01, confidence.median().item(), 1e-9])
    assert never["exit_rate"] == 0 and never["kl"] == 0 and never["top1_agreement"] == 1
    assert never["perplexity"] == pytest.approx(full["__reference__"]["perplexity"], rel=1e-6)
    assert always["exit_rate"] == 1
    for key in ("perplexity", "kl", "top1_agreement"):
        assert always[key] == pytest.approx(full["exit"][key], rel=1e-6)
    assert 0.4 < middle["exit_rate"] < 0.6 and 0 < middle["kl"] < always["kl"]
    table = markdown({"draft": "d", "accuracy": [never, middle, always]})
    assert table.count("\n| ") == 4 and "| 1.01 | 0.000 |" in table
