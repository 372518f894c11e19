"""Batched paged decode attention = per-sequence SDPA over the same blocks: ragged lengths, shared prefix
blocks, sliding windows, GQA; the Triton kernel on CUDA, or in Triton's interpreter on the CPU."""

import pytest
import torch
import torch.nn.functional as F

from runtime.paged_attention import kernel_applies, paged_decode_attention, paged_decode_attention_torch


def _case(seed: int, heads: int = 8, kv_heads: int = 2, dim: int = 32, block: int = 16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pool_k = torch.randn(40, block, kv_heads, dim, generator=gen).to(dtype)
    pool_v = torch.randn(40, block, kv_heads, dim, generator=gen).to(dtype)
    lengths = torch.tensor([1, 17, 40, 16, 63, 33])
    shared = [3, 7]  # rows 2 and 4 share their first two blocks (a common prompt prefix)
    tables = [[5], [9, 11], shared + [12], [13], shared + [14, 15], [20, 21, 22]]
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(tables), heads, dim, generator=gen).to(dtype)
    return q, pool_k, pool_v, block_tables, lengths, tables


def _per_sequence(q, pool_k, pool_v, tables, lengths, scale, window=None):
    """What the engine did before: each sequence's positions gathered and attended alone."""
    outs = []
    for b, table in enumerate(tables):
        n = int(lengths[b])
        pos = torch.arange(n)
        blocks = torch.tensor(table)[pos // pool_k.shape[1]]
        keys, values = pool_k[blocks, pos % pool_k.shape[1]], pool_v[blocks, pos % pool_k.shape[1]]  # (n, KV, D)
        mask = torch.ones(1, n, dtype=torch.bool) if window is None else (pos > n - 1 - window)[None]
        outs.append(F.scaled_dot_product_attention(q[b][:, None].float(), keys.transpose(0, 1).float(),
                                                   values.transpose(0, 1).float(), attn_mask=mask, scale=scale,
                                                   enable_gqa=True)[:, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("window", [None, 5, 16])
def test_gathered_batch_equals_per_sequence_attention(window):
    q, k, v, tables_t, lengths, tables = _case(0)
    got = paged_decode_attention_torch(q, k, v, tables_t.long(), lengths, 0.2, window)
    torch.testing.assert_close(got, _per_sequence(q, k, v, tables, lengths, 0.2, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5, 16, 40])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 6), (9, 3)])
def test_kernel_equals_per_sequence_attention(window, heads, kv_heads):
    pytest.importorskip("triton")  # without CUDA, tests/conftest.py has set TRITON_INTERPRET=1
    q, k, v, tables_t, lengths, tables = _case(1, heads, kv_heads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(device) for t in (q, k, v, tables_t, lengths)]
    assert kernel_applies(args[0], args[1], None, interpreter=True)
    got = paged_decode_attention(*args, 0.2, window, interpreter=True).cpu()
    torch.testing.assert_close(got, _per_sequence(q, k, v, tables, lengths, 0.2, window), rtol=1e-4, atol=1e-4)


def test_softcap_and_odd_shapes_take_the_gathered_path():
    q, k, v, tables_t, lengths, _ = _case(2, dim=24)  # head size 24: not a power of two
    assert not kernel_applies(q, k, None, interpreter=True)
    q2, k2, *_ = _case(3)
    assert not kernel_applies(q2, k2, softcap=30.0, interpreter=True)
    torch.testing.assert_close(paged_decode_attention(q, k, v, tables_t.long(), lengths, 0.2),
                               paged_decode_attention_torch(q, k, v, tables_t.long(), lengths, 0.2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_greedy_equals_transformers_with_the_kernel():
    from runtime.engine import Engine, SamplingParams
    from tests.conftest import greedy_reference, make_tiny_family

    for model_type in ("llama", "mistral", "qwen3"):  # plain, windowed, q/k-normed: the kernel serves all three
        model = make_tiny_family(model_type).cuda()
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 17, 9, 33, 1, 24)]
        outputs, _ = Engine(model, block_size=16, num_blocks=64).generate(prompts, SamplingParams(max_new_tokens=12))
        assert outputs == [greedy_reference(model, p, 12) for p in prompts], model_type


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2", "phi3"])
def test_prompt_chunks_in_one_call_equal_the_per_sequence_pass(model_type):
    """The flat prefill (CUDA's default): chunks of several sequences, some with cached prefixes, in one call."""
    from runtime.kv_cache import Sequence
    from runtime.paged_decoder import PagedDecoder
    from tests.conftest import make_tiny_family

    model = make_tiny_family(model_type)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 21, 14, 30)]
    outputs = []
    for flat in (False, True):
        runner = PagedDecoder(model, block_size=4, num_blocks=128)
        runner.flat_prefill = flat
        seqs = [Sequence(list(p)) for p in prompts]
        runner.forward(seqs[:2], ends=[5, 12])  # cached prefixes for two of them
        outputs.append(runner.forward(seqs, last_only=[False, True, False, True], ends=[9, 19, 14, 30]))
    for plain, flat in zip(*outputs, strict=True):
        torch.testing.assert_close(flat, plain, rtol=1e-5, atol=1e-5)
