"""The fused decode kernels against the PyTorch step: on CUDA compiled, elsewhere in Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # without CUDA, tests/conftest.py has set TRITON_INTERPRET=1

from runtime.static_decode import StaticDecoder  # noqa: E402
from runtime.triton_decode import decode_attention, fused_linear, verify_attention  # noqa: E402
from tests.conftest import greedy_reference, make_tiny_llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


CUDA_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot needs CUDA")


# rows 1 and 2-8 with TILES["small"] = gemv / gemv-rows take a GEMV; 2-8 with gemm and 9+ the tl.dot tile, whose
# bf16 the interpreter gets wrong (numpy has no bf16): bf16 is checked on the GEMV path there; 300 rows: torch ops
@pytest.mark.parametrize(("rows", "dtype", "small"), [
    (1, torch.float32, "gemv"), (3, torch.float32, "gemv"), (8, torch.float32, "gemv"), (3, torch.float32, "gemm"),
    (8, torch.float32, "gemm"), (9, torch.float32, "gemv"), (32, torch.float32, "gemv"),
    (2, torch.float32, "gemv-rows"), (5, torch.float32, "gemv-rows"), (8, torch.float32, "gemv-rows"),
    (1, torch.bfloat16, "gemv"), (5, torch.bfloat16, "gemv"), (3, torch.bfloat16, "gemv-rows"),
    (300, torch.float32, "gemv"), (300, torch.bfloat16, "gemv"),  # above TORCH_GEMM_ROWS: torch ops, cuBLAS
    pytest.param(5, torch.bfloat16, "gemm", marks=CUDA_ONLY), pytest.param(32, torch.bfloat16, "gemv", marks=CUDA_ONLY)])
def test_fused_linear_equals_unfused(rows, dtype, small, monkeypatch):
    from runtime import triton_decode

    monkeypatch.setitem(triton_decode.TILES, "small", (small,))
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 80, generator=gen).to(DEVICE, dtype)  # 80: K not a multiple of the tile
    weight = (torch.randn(96, 80, generator=gen) / 8).to(DEVICE, dtype)
    gain = (torch.rand(80, generator=gen) + 0.5).to(DEVICE, dtype)
    residual = torch.randn(rows, 96, generator=gen).to(DEVICE, dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(fused_linear(x, weight, norm=gain), F.rms_norm(x, (80,), gain, 1e-5) @ weight.t(),
                               **tol)
    torch.testing.assert_close(fused_linear(x, weight, residual=residual), residual + x @ weight.t(), **tol)
    torch.testing.assert_close(fused_linear(x, weight, swiglu=True),
                               F.silu(x @ weight[:48].t()) * (x @ weight[48:].t()), **tol)


def test_decode_attention_equals_sdpa_with_left_padding():
    heads, kv_heads, dim, length, batch, col = 6, 2, 16, 80, 3, 70  # 70 columns: more than two tiles
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen)
    k_cache = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v_cache = torch.randn(batch, kv_heads, length, dim, generator=gen)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for row, pad in enumerate((0, 9, 40)):
        valid[row, pad:col] = True
    pos = (col - torch.tensor([0, 9, 40]))[:, None]
    angles = torch.arange(length)[:, None] * torch.rand(dim // 2, generator=gen).repeat(2)[None]
    cos, sin = angles.cos(), angles.sin()
    k_ref, v_ref, valid_ref = k_cache.clone(), v_cache.clone(), valid.clone()
    on_device = [t.to(DEVICE) for t in (qkv, k_cache, v_cache, cos, sin, pos, torch.tensor([col]), valid)]
    out = decode_attention(*on_device, heads, kv_heads, dim)

    def rotate(x, p):  # (B, N, D) at positions p (B,)
        half = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
        return x * cos[p][:, None] + half * sin[p][:, None]
    q = rotate(qkv[:, :heads * dim].view(batch, heads, dim), pos[:, 0])
    k = rotate(qkv[:, heads * dim:(heads + kv_heads) * dim].view(batch, kv_heads, dim), pos[:, 0])
    v = qkv[:, (heads + kv_heads) * dim:].view(batch, kv_heads, dim)
    k_ref[:, :, col], v_ref[:, :, col], valid_ref[:, col] = k, v, True
    expected = F.scaled_dot_product_attention(q[:, :, None], k_ref, v_ref, attn_mask=valid_ref[:, None, None],
                                              enable_gqa=True)
    torch.testing.assert_close(out.cpu(), expected.reshape(batch, heads * dim), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on_device[1].cpu(), k_ref)  # the new k and v are in the caches
    torch.testing.assert_close(on_device[2].cpu(), v_ref)
    assert torch.equal(on_device[-1].cpu(), valid_ref)  # and the new column is marked valid


def test_multi_row_gemv_rows_equal_single_row_gemv_bitwise(monkeypatch):
    """With the GEMV, a verify pass over k + 1 tokens scores each exactly as a one-token decode step would."""
    from runtime import triton_decode

    monkeypatch.setitem(triton_decode.TILES, "small", ("gemv",))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 80, generator=gen).to(DEVICE)
    weight, gain = torch.randn(96, 80, generator=gen).to(DEVICE), torch.rand(80, generator=gen).to(DEVICE)
    together = fused_linear(x, weight, norm=gain)
    for row in range(5):
        assert torch.equal(together[row:row + 1], fused_linear(x[row:row + 1], weight, norm=gain))


def test_verify_attention_equals_causal_sdpa():
    heads, kv_heads, dim, length, col, tokens, pad = 6, 2, 16, 96, 70, 5, 4  # 70 + 5 columns: three tiles
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    k_cache = torch.randn(1, kv_heads, length, dim, generator=gen)  # stale values beyond col: must be ignored
    v_cache = torch.randn(1, kv_heads, length, dim, generator=gen)
    valid = torch.zeros(1, length, dtype=torch.bool)
    valid[0, pad:] = True  # left padding before, stale "valid" columns after col (a rolled-back tail)
    pos = col - pad
    angles = torch.arange(length)[:, None] * torch.rand(dim // 2, generator=gen).repeat(2)[None]
    cos, sin = angles.cos(), angles.sin()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    on_device = [t.to(DEVICE) for t in (qkv, k_cache, v_cache, cos, sin, torch.tensor([pos]), torch.tensor([col]),
                                        valid)]
    out = verify_attention(*on_device, heads, kv_heads, dim)

    def rotate(x):  # (T, N, D) at positions pos..pos+T-1
        half = torch.cat([-x[..., dim // 2:], x[..., :dim // 2]], -1)
        p = pos + torch.arange(tokens)
        return x * cos[p][:, None] + half * sin[p][:, None]
    q = rotate(qkv[:, :heads * dim].view(tokens, heads, dim))
    k = rotate(qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim))
    v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    k_ref[0, :, col:col + tokens], v_ref[0, :, col:col + tokens] = k.transpose(0, 1), v.transpose(0, 1)
    columns = torch.arange(length)
    mask = valid[0][None] & (columns[None] <= col + torch.arange(tokens)[:, None])  # (T, L)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_ref, v_ref, attn_mask=mask[None, None],
                                              enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(out.cpu(), expected.reshape(tokens, heads * dim), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on_device[1].cpu(), k_ref)
    torch.testing.assert_close(on_device[2].cpu(), v_ref)
    assert on_device[-1].cpu()[0, col:col + tokens].all()


def test_fused_greedy_equals_hf_for_mixed_lengths():
    model = make_tiny_llama(vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2)
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 17, 1, 11, 9)]
    expected = [greedy_reference(model, p, 10) for p in prompts]
    static = StaticDecoder(model.to(DEVICE), max_batch=8, max_len=48)
    static.use_fused_kernels()
    assert static.generate(prompts, 10, use_graph=False) == expected
    if DEVICE == "cuda":
        assert static.generate(prompts, 10, use_graph=True) == expected


@pytest.mark.parametrize(("rows", "small"), [(1, "gemv"), (3, "gemv"), (3, "gemv-rows")])
@pytest.mark.parametrize("case", ["tie", "negative"])
def test_fused_argmax_equals_torch(rows, small, case, monkeypatch):
    from runtime import triton_decode
    from runtime.triton_decode import ARGMAX_EMPTY, finish_step

    monkeypatch.setitem(triton_decode.TILES, "small", (small,))

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=gen)
    weight = torch.randn(300, 64, generator=gen)
    if case == "tie":  # columns 7 and 200 tie at row 0's maximum: the lower wins, as in torch.argmax
        weight[7] = weight[200] = 2 * x[0]
    else:  # every logit negative
        x, weight = x.abs(), -weight.abs()
    best = torch.full((rows,), ARGMAX_EMPTY, dtype=torch.long, device=DEVICE)
    fused_linear(x.to(DEVICE), weight.to(DEVICE), argmax_into=best)
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=DEVICE)
    pos = torch.arange(rows, device=DEVICE)[:, None]
    col = torch.zeros(1, dtype=torch.long, device=DEVICE)
    finish_step(best, tokens, pos, col)
    expected = (x @ weight.t()).argmax(-1)
    assert tokens[:, 0].cpu().tolist() == expected.tolist()
    if case == "tie":
        assert expected[0] == 7
    assert pos[:, 0].cpu().tolist() == [i + 1 for i in range(rows)] and col.item() == 1
    assert (best.cpu() == ARGMAX_EMPTY).all()  # reset for the next step


@pytest.mark.slow
def test_fused_step_on_the_real_model_equals_hf_greedy(reference_artifact, monkeypatch):
    from runtime import triton_decode
    from runtime.loading import load_model, load_tokenizer

    if DEVICE == "cpu":  # big tiles: fewer programs for the interpreter to walk through
        monkeypatch.setitem(triton_decode.TILES, "gemv", (256, 4, 1024, 4))
    tokenizer = load_tokenizer(reference_artifact.path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}],
                                           add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    model = load_model(reference_artifact.path, "cpu", dtype=torch.float32)
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    static = StaticDecoder(model.to(DEVICE), max_batch=1, max_len=len(prompt) + 16, dtype=torch.float32)
    static.use_fused_kernels()
    assert static.generate([prompt], len(expected), use_graph=False)[0] == expected
