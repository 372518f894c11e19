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


@pytest.mark.parametrize("window", [None, 40])
def test_query_rows_sharing_a_table_equal_per_sequence_attention(window):
    """The token rows of a prompt chunk: several query rows read one sequence's table (`table_rows`), at
    lengths spanning several 64-position tiles; the kernel and the gathered path = per-sequence attention."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 40, 16, 3, 32, generator=gen)
    seqs = [list(range(9)), [10, 11, 12, 13, 14]]
    lengths, table_rows = torch.tensor([1, 65, 130, 70, 129]), torch.tensor([0, 0, 0, 1, 0], dtype=torch.int32)
    q = torch.randn(5, 9, 32, generator=gen)
    block_tables = torch.tensor([seqs[0], seqs[1] + [0] * 4], dtype=torch.int32)
    want = _per_sequence(q, k, v, [seqs[int(r)] for r in table_rows], lengths, 0.2, window)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = paged_decode_attention(*(t.to(device) for t in (q, k, v, block_tables, lengths)), 0.2, window,
                                 interpreter=True, table_rows=table_rows.to(device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gathered = paged_decode_attention(q, k, v, block_tables, lengths, 0.2, window, softcap=None,
                                      table_rows=table_rows)  # interpreter not asked: the gathered path
    torch.testing.assert_close(gathered, want, rtol=1e-4, atol=1e-4)


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


def _greedy_with(runner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    from runtime.kv_cache import Sequence

    seqs = [Sequence(list(p)) for p in prompts]
    for _ in range(steps):  # the first pass prefills, the others are decode-only steps
        for s, row in zip(seqs, runner.forward(seqs), strict=True):
            s.tokens.append(int(row[-1].argmax()))
    return [s.tokens[len(p):] for s, p in zip(seqs, prompts, strict=True)]


def test_fused_decode_step_equals_the_module_step_and_transformers():
    """The fused layer kernels over the paged pool (Triton's interpreter here, compiled on CUDA), decode steps
    and prompt chunks: the same logits as the HF modules' path, and greedy = HF greedy on ragged prompts
    crossing block boundaries."""
    pytest.importorskip("triton")
    from runtime.kv_cache import Sequence
    from runtime.paged_decoder import PagedDecoder
    from tests.conftest import greedy_reference, make_tiny_family

    model = make_tiny_family("llama").to("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 17, 1, 71)]  # 71: two 64-tiles
    fused = PagedDecoder(model, block_size=16, num_blocks=32, fused=True)
    plain = PagedDecoder(model, block_size=16, num_blocks=32, fused=False)
    assert fused.use_fused and not plain.use_fused
    fused.flat_prefill = True  # CUDA's default: the prompt chunks of a step in one attention call
    steps = []
    for runner in (plain, fused):
        seqs = [Sequence(list(p)) for p in prompts]
        prefill = runner.forward(seqs, last_only=False)
        for s in seqs:
            s.tokens.append(7)
        steps.append((torch.cat(prefill), torch.cat(runner.forward(seqs))))
    for got, want in zip(steps[1], steps[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    fused.compile_fused_shapes()  # what a CUDA server runs at start (every row-count variant)
    assert _greedy_with(fused, prompts, 12) == [greedy_reference(model, p, 12) for p in prompts]


def test_token_rows_step_equals_the_module_pass_and_transformers():
    """Steps with prompt chunks as token rows of the decode kernels (CUDA's default; Triton's interpreter here):
    chunks over cached prefixes beside decode rows, logits of last or all rows, the same as the HF modules'
    pass, and so are the final-norm features an EAGLE head reads (`keep_features`: every step, decode-only
    ones too, then runs as token rows); greedy through it = HF greedy."""
    pytest.importorskip("triton")
    from runtime.kv_cache import Sequence
    from runtime.paged_decoder import PagedDecoder
    from tests.conftest import greedy_reference, make_tiny_family

    model = make_tiny_family("llama").to("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 21, 14, 40)]
    outputs, features = [], []
    for fused in (False, True):
        runner = PagedDecoder(model, block_size=16, num_blocks=32, fused=fused)
        runner.token_rows = fused
        runner.keep_features = True
        assert runner.use_fused == fused
        seqs = [Sequence(list(p)) for p in prompts]
        runner.forward(seqs[:3], ends=[5, 20, 13])  # cached prefixes; seqs 1 and 2 then decode one token
        features.append(runner.features)
        outputs.append(runner.forward(seqs, last_only=[False, True, False, True], ends=[9, 21, 14, 33]))
        features.append(runner.features)
        for s in seqs:
            s.tokens.append(7)
        outputs.append(runner.forward(seqs, last_only=[True, True, True, False]))  # 3 decode rows, 1 chunk
        features.append(runner.features)
        for s in seqs[:3]:
            s.tokens.append(9)
        outputs.append(runner.forward(seqs[:3], last_only=True))  # decode rows only
        features.append(runner.features)
    for plain, rows in zip(features[:4], features[4:], strict=True):
        assert [f.shape for f in rows] == [f.shape for f in plain]
        for want, got in zip(plain, rows, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for plain, rows in zip(outputs[:3], outputs[3:], strict=True):
        for want, got in zip(plain, rows, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    runner = PagedDecoder(model, block_size=16, num_blocks=32, fused=True)
    runner.token_rows = True
    assert _greedy_with(runner, prompts, 6) == [greedy_reference(model, p, 6) for p in prompts]


def test_fused_step_is_refused_where_it_does_not_compute_the_model():
    from runtime.paged_decoder import PagedDecoder
    from tests.conftest import make_tiny_family

    for model_type in ("qwen2", "gemma2", "mistral"):  # biases, sandwich norms + soft-capping, windows
        assert PagedDecoder(make_tiny_family(model_type), block_size=16, num_blocks=8, fused=True).fused is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_serving_64_concurrent_requests_equal_transformers_and_graph_equals_eager(fused):
    """64 concurrent mixed-length greedy requests through the scheduler on CUDA (tiny fp32 model, graphs per
    bucket, fused or HF-module step) = HF greedy; a graph-replayed step = the same step run eagerly."""
    from runtime.engine import Engine, SamplingParams
    from runtime.kv_cache import Sequence
    from runtime.scheduler import Request, Scheduler
    from tests.conftest import greedy_reference, make_tiny_family

    model = make_tiny_family("llama").cuda()
    engine = Engine(model, block_size=16, num_blocks=512, fused=fused)
    assert engine.runner.use_fused == fused and engine.runner.use_graphs
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 500, (int(n),), generator=gen).tolist() for n in torch.randint(1, 90, (64,),
                                                                                                 generator=gen)]
    scheduler = Scheduler(engine, max_context=256, max_running=64, max_queue=65, max_batch_tokens=512)
    requests = [Request(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    for r in requests:
        scheduler.submit(r)
    while any(r.finished < r.n for r in requests):
        scheduler.step()
    assert [r.outputs[0] for r in requests] == [greedy_reference(model, p, 10) for p in prompts]
    runner = engine.runner
    seqs = [Sequence(list(p)) for p in prompts[:37]]  # 37 rows: the 64-row bucket with padding
    runner.forward(seqs)
    for s in seqs:
        s.tokens.append(11)
    replayed = torch.cat(runner.forward(seqs))
    for s in seqs:  # the same step again, eagerly, over the same cache positions
        s.cached -= 1
    runner.use_graphs = False
    eager = torch.cat(runner.forward(seqs))
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_token_rows_graph_equals_eager():
    """A step of prompt chunks replayed from its token-count bucket's graph = the same step run eagerly."""
    from runtime.kv_cache import Sequence
    from runtime.paged_decoder import PagedDecoder
    from tests.conftest import make_tiny_family

    runner = PagedDecoder(make_tiny_family("llama").cuda(), block_size=16, num_blocks=64)
    assert runner.use_fused and runner.token_rows and runner.use_graphs
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (9, 70, 1, 33)]  # 113 rows: bucket 128
    results = []
    for graphs in (True, False):
        runner.use_graphs = graphs
        seqs = [Sequence(list(p)) for p in prompts]
        results.append(torch.cat(runner.forward(seqs, last_only=False)))
        for s in seqs:
            runner.pool.free_sequence(s)
    assert list(runner.row_graphs) == [128]
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_warm_up_leaves_the_pool_empty_and_answers_unchanged():
    """The server's warm-up runs a step of prompt chunks (kernels compiled before the first request) on blocks
    it gives back: the pool is as before and greedy answers do not change."""
    from runtime.engine import Engine, SamplingParams
    from tests.conftest import greedy_reference, make_tiny_family

    model = make_tiny_family("llama")
    engine = Engine(model, block_size=16, num_blocks=32)
    engine.runner.flat_prefill = True  # CUDA's default, where the warm-up runs its prompt chunks
    free = len(engine.pool.free)
    engine.runner.warm_up(4)
    assert engine.pool.used == 0 and len(engine.pool.free) == free
    prompts = [[5, 9, 13, 2, 7], list(range(3, 40))]
    outputs, _ = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert outputs == [greedy_reference(model, p, 6) for p in prompts]
