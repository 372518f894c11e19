import pytest
import torch

from compress.gptq import QuantSpec, find_params, quantize_gptq, quantize_rtn


def correlated_problem(out_f=48, in_f=96, n=2048, seed=0, rank=32):
    """Inputs that live mostly in a low-dimensional subspace, as LLM activations do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen)
    x += 0.1 * torch.randn(n, in_f, generator=gen)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    return w, x, 2.0 * x.t() @ x / n


def output_error(w, w_hat, x):
    return ((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm()).item()


@pytest.mark.parametrize("spec", [
    QuantSpec(4, 32, True, False), QuantSpec(4, 32, False, False), QuantSpec(4, 64, True, True),
    QuantSpec(4, -1, False, True), QuantSpec(8, 32, True, False), QuantSpec(4, 64, False, False),
])
def test_gptq_beats_rtn_on_layer_output(spec):
    w, x, h = correlated_problem()
    rtn = quantize_rtn(w, spec)
    gptq = quantize_gptq(w, h, spec)
    err_rtn, err_gptq = output_error(w, rtn.dequantized(), x), output_error(w, gptq.dequantized(), x)
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_results_lie_on_the_grid_and_groups_are_valid():
    w, _, h = correlated_problem(in_f=96)
    spec = QuantSpec(4, 64, False, True)  # ragged: 96 = 64 + 32, act-order
    r = quantize_gptq(w, h, spec)
    assert r.q.min() >= 0 and r.q.max() <= 15 and r.q.dtype == torch.int32
    assert r.scales.shape == (2, 48) and r.zeros.min() >= 1
    counts = torch.bincount(r.g_idx.long())
    assert counts.tolist() == [64, 32]
    assert torch.equal(r.scales, r.scales.half().float())  # fp16-exact scales


def test_desc_act_groups_follow_hessian_order():
    w, _, h = correlated_problem(in_f=64)
    r = quantize_gptq(w, h, QuantSpec(4, 32, True, True))
    order = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(r.g_idx[order[:32]], torch.zeros(32, dtype=torch.int32))
    assert torch.equal(r.g_idx[order[32:]], torch.ones(32, dtype=torch.int32))


def test_sym_zero_point_and_all_zero_rows():
    w = torch.zeros(8, 32)
    w[0] = torch.linspace(-1, 1, 32)
    scale, zero = find_params(w, QuantSpec(4, 32, True))
    assert torch.all(zero == 8) and torch.all(scale > 0)
    r = quantize_rtn(w, QuantSpec(4, 32, True))
    assert torch.all(r.dequantized()[1:] == 0)


def test_dead_inputs_do_not_break_gptq():
    w, x, h = correlated_problem(in_f=32)
    h[3, :] = 0
    h[:, 3] = 0
    r = quantize_gptq(w, h, QuantSpec(4, 32, True))
    assert torch.isfinite(r.dequantized()).all()
