import pytest
import torch

from runtime.quantized import (
    Int8DynamicLinear,
    dequantize_gptq,
    pack_cols,
    pack_gptq,
    pack_rows,
    quantize_int8_weight,
    unpack_cols,
    unpack_rows,
)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (64, 24), generator=gen)
    q[0, 0] = (1 << bits) - 1  # top bit of the int32 set
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits), q)
    assert torch.equal(unpack_cols(pack_cols(q, bits), bits), q)
    assert pack_rows(q, bits).dtype == torch.int32 and pack_rows(q, bits).shape == (64 * bits // 32, 24)


def test_pack_rejects_unpackable_rows():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 4, dtype=torch.int64), 4)


def test_gptq_layout_documented_order():
    # The first packed int32 holds rows 0..7 of column 0, row 0 in the lowest 4 bits.
    q = torch.zeros(8, 1, dtype=torch.int64)
    q[:, 0] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    assert pack_rows(q, 4)[0, 0].item() == 0x87654321 - (1 << 32)


def test_ragged_groups_dequantize():
    out_f, in_f, bits, gs = 16, 96, 4, 64
    q = torch.randint(0, 16, (out_f, in_f))
    scales = torch.rand(2, out_f) + 0.1
    zeros = torch.randint(1, 16, (2, out_f))
    g_idx = torch.arange(in_f) // gs  # groups of 64 and 32
    tensors = pack_gptq(q, scales, zeros, g_idx, bits)
    w = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    expected = scales.half().float()[g_idx].t() * (q.float() - zeros[g_idx].t().float())
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


def test_int8_dynamic_linear_close_to_fp32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    q = Int8DynamicLinear(64, 32)
    q.weight_int8, q.weight_scale = quantize_int8_weight(lin.weight.detach())
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    rel = (q(x) - ref).norm() / ref.norm()
    assert rel < 0.02
    xq, xs = Int8DynamicLinear.quantize_tokens(x)
    assert xq.abs().max() <= 127 and xs.shape == (3, 5, 1)
