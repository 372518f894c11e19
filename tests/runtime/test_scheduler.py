import pytest
import torch

from runtime.engine import Engine, SamplingParams
from runtime.kv_cache import Sequence
from runtime.scheduler import QueueFull, Request, Scheduler
from tests.conftest import greedy_reference, make_tiny_llama


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2)



def drain(scheduler: Scheduler, requests: list[Request], limit: int = 500) -> int:
    steps = 0
    while any(r.finished < r.n for r in requests if not r.cancelled):
        scheduler.step()
        steps += 1
        assert steps < limit
    return steps


def run_greedy(scheduler: Scheduler, model, prompts: list[list[int]], n: int) -> list[Request]:
    """Submit every prompt, run to the end; each answer must equal plain greedy decoding of `model`."""
    requests = [Request(p, SamplingParams(max_new_tokens=n)) for p in prompts]
    for r in requests:
        scheduler.submit(r)
    drain(scheduler, requests)
    for r, p in zip(requests, prompts, strict=True):
        assert r.outputs[0] == greedy_reference(model, p, n)
    return requests


def test_mixed_lengths_with_chunked_prefill_match_greedy_reference(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=512, max_batch_tokens=16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (3, 40, 9, 17, 33)]
    requests = [Request(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    for r in requests[:3]:
        scheduler.submit(r)
    scheduler.step()  # the others join a batch already running
    for r in requests[3:]:
        scheduler.submit(r)
    drain(scheduler, requests)
    for r, p in zip(requests, prompts, strict=True):
        assert r.outputs[0] == greedy_reference(model, p, 10)
        assert r.finish_reasons == ["length"]
    assert scheduler.pool.used == 0 and scheduler.reserved_blocks == 0


def test_cancel_frees_blocks_at_the_next_step(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=64), max_context=256)
    request = Request(list(range(3, 40)), SamplingParams(max_new_tokens=100))
    scheduler.submit(request)
    for _ in range(3):
        scheduler.step()
    assert scheduler.pool.used > 0
    scheduler.cancel(request)
    scheduler.step()
    assert scheduler.pool.used == 0 and scheduler.reserved_blocks == 0
    assert scheduler.stats.cancelled_requests == 1 and not scheduler.running


def test_parallel_samples_share_the_prompt_blocks(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=64), max_context=256)
    request = Request(list(range(3, 44)), SamplingParams(max_new_tokens=6, temperature=1.0, seed=1), n=3)
    scheduler.submit(request)
    drain(scheduler, [request])
    assert [len(o) for o in request.outputs] == [6, 6, 6]
    assert scheduler.pool.prefix_hits >= 2 * 5  # 41 prompt tokens: 5 full blocks reused by each sibling
    again = Request(list(range(3, 44)), SamplingParams(max_new_tokens=6, temperature=1.0, seed=1), n=3)
    scheduler.submit(again)
    drain(scheduler, [again])
    assert again.outputs == request.outputs  # seeded samples are reproducible


def test_queue_bound_priorities_and_admission_by_blocks(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=12), max_context=96, max_queue=2)
    low = Request(list(range(3, 30)), SamplingParams(max_new_tokens=40), priority=5)
    high = Request(list(range(3, 30)), SamplingParams(max_new_tokens=40), priority=0)
    scheduler.submit(low)
    scheduler.submit(high)
    with pytest.raises(QueueFull):
        scheduler.submit(Request([5, 6], SamplingParams(max_new_tokens=2)))
    scheduler.step()
    # each needs ceil(67 / 8) = 9 of the 12 blocks: one runs at a time, the high-priority one first
    assert [s.request for s in scheduler.running] == [high]
    drain(scheduler, [low, high])
    assert high.first_token_at < low.first_token_at
    with pytest.raises(ValueError, match="context"):
        scheduler.submit(Request(list(range(3, 90)), SamplingParams(max_new_tokens=20)))


def test_response_cache_serves_only_the_same_key(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=64), max_context=256, response_cache_size=4)
    first = Request([5, 6, 7, 8], SamplingParams(max_new_tokens=5), logprobs=2, cache_key=("a",))
    scheduler.submit(first)
    drain(scheduler, [first])
    steps = scheduler.stats.steps
    second = Request([5, 6, 7, 8], SamplingParams(max_new_tokens=5), logprobs=2, cache_key=("a",))
    scheduler.submit(second)
    assert second.finished == 1 and second.outputs == first.outputs and second.records == first.records
    assert scheduler.stats.steps == steps and scheduler.stats.response_cache_hits == 1
    for other in (Request([5, 6, 7, 8], SamplingParams(max_new_tokens=5), cache_key=("b",)),
                  Request([5, 6, 7, 8], SamplingParams(max_new_tokens=5))):  # no key: never cached
        scheduler.submit(other)
        drain(scheduler, [other])
    assert scheduler.stats.response_cache_hits == 1 and len(scheduler.response_cache) == 2


def test_logprobs_and_prompt_scores_match_the_model(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=64), max_context=256, max_batch_tokens=8)
    prompt = list(range(3, 23))  # 20 tokens over three prefill chunks
    warm = Request(prompt, SamplingParams(max_new_tokens=1))  # puts the prompt's blocks in the prefix cache
    scheduler.submit(warm)
    drain(scheduler, [warm])
    request = Request(prompt, SamplingParams(max_new_tokens=4), logprobs=3, prompt_logprobs=True)
    scheduler.submit(request)
    drain(scheduler, [request])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + request.outputs[0]])).logits[0].log_softmax(-1)
    expect_prompt = [float(logp[i, t]) for i, t in enumerate(prompt[1:])]
    assert [lp for lp, _ in request.prompt_scores] == pytest.approx(expect_prompt, abs=1e-4)
    for j, (token, lp, top) in enumerate(request.records[0]):
        row = logp[len(prompt) - 1 + j]
        assert lp == pytest.approx(float(row[token]), abs=1e-4)
        assert [i for i, _ in top] == row.topk(3).indices.tolist() and top[0][1] >= lp
    only_prompt = Request(prompt, SamplingParams(max_new_tokens=0), logprobs=0, prompt_logprobs=True)
    scheduler.submit(only_prompt)
    drain(scheduler, [only_prompt])
    assert only_prompt.outputs == [[]] and only_prompt.finish_reasons == ["length"]
    assert len(only_prompt.prompt_scores) == len(prompt) - 1 and scheduler.pool.used == 0


def test_logit_bias_and_penalties_steer_greedy_decoding(model):
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=64), max_context=256)
    prompt = [5, 6, 7, 8]
    forced = Request(prompt, SamplingParams(max_new_tokens=4, logit_bias=((42, 100.0),)))
    banned = Request(prompt, SamplingParams(max_new_tokens=6, presence_penalty=2.0, frequency_penalty=2.0,
                                            logit_bias=((9, -100.0),)))
    for r in (forced, banned):
        scheduler.submit(r)
    drain(scheduler, [forced, banned])
    assert forced.outputs[0] == [42, 42, 42, 42]
    assert 9 not in banned.outputs[0]
    # the penalty, replayed by hand on the model's logits, picks exactly these tokens
    ids, expect = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            logits[9] -= 100.0
            for t in set(expect):
                logits[t] -= 2.0 + 2.0 * expect.count(t)
            expect.append(int(logits.argmax()))
            ids.append(expect[-1])
    assert banned.outputs[0] == expect


def test_speculative_steps_in_the_batch_keep_greedy_output():
    # untied random models: tied ones just repeat the last prompt token, which any draft guesses
    model = make_tiny_llama(vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2, tie=False)
    draft_model = make_tiny_llama(vocab_size=300, hidden=64, layers=1, heads=4, kv_heads=2, seed=7, tie=False)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (4, 30, 12)]
    for draft, exact in ((Engine(model, block_size=8, num_blocks=128), True),
                         (Engine(draft_model, block_size=8, num_blocks=128), False)):
        scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256, max_batch_tokens=16,
                              draft=draft, k=3)
        run_greedy(scheduler, model, prompts, 11)
        stats = scheduler.stats
        assert stats.draft_proposed > 0
        if exact:  # the target as its own draft: every proposal accepted, k + 1 tokens per target step
            assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_step > 3
        else:
            assert stats.acceptance_rate < 1.0
        assert scheduler.pool.used == 0 and scheduler.draft.pool.used == 0


def test_speculative_sampling_runs_and_respects_max_tokens(model):
    draft_model = make_tiny_llama(vocab_size=300, hidden=64, layers=1, heads=4, kv_heads=2, seed=7)
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256,
                          draft=Engine(draft_model, block_size=8, num_blocks=128), k=4)
    request = Request(list(range(3, 20)), SamplingParams(max_new_tokens=9, temperature=1.0, seed=5), n=2)
    scheduler.submit(request)
    drain(scheduler, [request])
    assert [len(o) for o in request.outputs] == [9, 9]
    assert 0 <= scheduler.stats.acceptance_rate <= 1


def test_eagle_head_in_the_batch_keeps_greedy_output_and_samples():
    """An EAGLE head as the served draft: chunked prompts, a shared prefix (n = 2 siblings read the prompt from
    the prefix cache), greedy = the target's greedy output; sampled requests finish at max_tokens."""
    from runtime.eagle import new_head

    model = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False, seed=4)
    head = new_head(model).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (4, 30, 12, 1)]
    prompts.append(prompts[1][:24] + [7, 7])  # shares three full blocks with the second prompt
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256, max_batch_tokens=16,
                          draft=head, k=3)
    run_greedy(scheduler, model, prompts, 14)
    stats = scheduler.stats
    assert 0 < stats.draft_accepted < stats.draft_proposed  # both branches of the acceptance ran
    assert stats.draft_calls > 0 and stats.draft_seconds > 0
    assert scheduler.pool.used == 0 and scheduler.reserved_blocks == 0
    request = Request(list(range(3, 20)), SamplingParams(max_new_tokens=9, temperature=1.0, seed=5), n=2)
    scheduler.submit(request)
    drain(scheduler, [request])
    assert [len(o) for o in request.outputs] == [9, 9]
    cache = scheduler.head_cache  # every finished sequence gave its head slot back
    assert sorted(cache.free) == list(range(cache.scratch))


def test_exit_head_in_the_batch_keeps_greedy_output_beside_chunks_and_samples():
    """An exit head as the served draft: greedy sequences draft with the target's first layers and are verified
    from their layer-L states beside the batched pass of prompt chunks and a sampled request (not drafted);
    greedy = the target's greedy output, both branches of the acceptance run, every block comes back."""
    from tests.conftest import tiny_target_and_exit

    model, head = tiny_target_and_exit()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (4, 30, 12, 1)]
    prompts.append(prompts[1][:24] + [7, 7])  # shares three full blocks with the second prompt
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256, max_batch_tokens=16,
                          draft=head, k=3)
    sampled = Request(list(range(3, 20)), SamplingParams(max_new_tokens=9, temperature=1.0, seed=5))
    scheduler.submit(sampled)
    run_greedy(scheduler, model, prompts, 14)
    drain(scheduler, [sampled])
    stats = scheduler.stats
    assert 0 < stats.draft_accepted < stats.draft_proposed
    assert stats.step_kinds["mixed"][0] > 0  # steps where prompt chunks ran beside decoding rows
    assert len(sampled.outputs[0]) == 9
    assert scheduler.pool.used == 0 and scheduler.reserved_blocks == 0


@pytest.mark.parametrize("keep", [True, False])
def test_eagle_head_takes_kept_features_for_a_prefix_cache_hit(keep, monkeypatch):
    """A prompt whose first three blocks the prefix cache serves: the head gets those blocks' features as the
    first request left them instead of a pass of the target over the cached part (counted); greedy output
    stays the target's. Control (`keep=False`: the kept features dropped): the target runs once over them."""
    from runtime.eagle import new_head

    model = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False, seed=4)
    head = new_head(model).eval()
    first = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256, max_batch_tokens=64,
                          draft=head, k=3)
    run_greedy(scheduler, model, [first], 10)
    with torch.no_grad():  # what the head's fallback computes for the three blocks: what was kept
        truth = model.model(torch.tensor([first[:24]]), use_cache=False).last_hidden_state[0]
    kept = torch.cat([scheduler.prefix_features[h] for h in scheduler._block_hashes(Sequence(first), 3)])
    torch.testing.assert_close(kept, truth, rtol=1e-4, atol=1e-4)
    if not keep:
        scheduler.prefix_features.clear()
    passes = []
    forward = model.model.forward

    def counted(*args, **kwargs):  # the head's fallback: the target's layers over the cached prompt part
        passes.append(kwargs.get("use_cache"))
        return forward(*args, **kwargs)
    monkeypatch.setattr(model.model, "forward", counted)
    run_greedy(scheduler, model, [first[:24] + [7, 7]], 10)
    assert scheduler.pool.prefix_hits == 3
    assert passes.count(False) == (0 if keep else 1)
    assert scheduler.stats.prefix_feature_blocks == (3 if keep else 0)


@pytest.mark.parametrize("eagle", [False, True])
def test_drafting_pauses_above_draft_max_batch(eagle):
    """With draft_max_batch=1 the draft proposes only once a single sequence decodes; both drafts stay in step
    with the target meanwhile (greedy output unchanged)."""
    from runtime.eagle import new_head

    model = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False, seed=4)
    draft = new_head(model).eval() if eagle else Engine(model, block_size=8, num_blocks=128)
    scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256, draft=draft, k=3,
                          draft_max_batch=1)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 9, 14)]
    requests = [Request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, (4, 6, 20), strict=True)]
    for r in requests:
        scheduler.submit(r)
    proposed_while_shared = []
    while any(r.finished < r.n for r in requests):
        shared = sum(not s.prefilling for s in scheduler.running) > 1
        before = scheduler.stats.draft_proposed
        scheduler.step()
        if shared:
            proposed_while_shared.append(scheduler.stats.draft_proposed - before)
    for r, p in zip(requests, prompts, strict=True):
        assert r.outputs[0] == greedy_reference(model, p, len(r.outputs[0]))
    assert proposed_while_shared and not any(proposed_while_shared)
    assert scheduler.stats.draft_proposed > 0  # the last request, alone, drafted
    assert scheduler.pool.used == 0


def test_concurrent_requests_through_the_fused_step_match_greedy_reference():
    """The serving loop over the fused layer kernels (Triton's interpreter here; compiled with CUDA graphs on
    a GPU: tests/runtime/test_paged_attention.py): mixed lengths, chunked prefill, rows joining mid-run."""
    pytest.importorskip("triton")
    from tests.conftest import make_tiny_family

    model = make_tiny_family("llama").to("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(model, block_size=16, num_blocks=64, fused=True)
    assert engine.runner.use_fused
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 19, 1, 35, 12, 27)]
    run_greedy(Scheduler(engine, max_context=256, max_batch_tokens=24), model, prompts, 8)


@pytest.mark.parametrize("fused", [False, True])
def test_multi_step_decoding_matches_greedy_and_stops_mid_burst(model, fused):
    """decode_steps > 1: bursts of greedy steps fed back on the device; a stop token or max_tokens inside a
    burst ends the answer there, later arrivals still get admitted, and every block comes back."""
    if fused:
        pytest.importorskip("triton")
        from tests.conftest import make_tiny_family

        model = make_tiny_family("llama").to("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(model, block_size=16, num_blocks=128, fused=fused)
    scheduler = Scheduler(engine, max_context=256, max_batch_tokens=64, decode_steps=5)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (6, 23, 1, 40)]
    expected = [greedy_reference(model, p, 13) for p in prompts]
    stop = expected[1][6]  # ends the second answer inside a burst
    requests = [Request(p, SamplingParams(max_new_tokens=13 if i != 2 else 7, stop_ids=(stop,) if i == 1 else ()))
                for i, p in enumerate(prompts)]
    for r in requests[:3]:
        scheduler.submit(r)
    for _ in range(4):
        scheduler.step()
    scheduler.submit(requests[3])
    steps = 4 + drain(scheduler, requests)
    assert steps < 13  # one token per step would take at least 13 steps (plus prefill)
    assert requests[0].outputs[0] == expected[0] and requests[3].outputs[0] == expected[3]
    assert requests[1].outputs[0] == expected[1][:expected[1].index(stop) + 1]
    assert requests[1].finish_reasons == ["stop"] and requests[2].outputs[0] == expected[2][:7]
    assert scheduler.pool.used == 0 and scheduler.reserved_blocks == 0


def test_bursts_go_on_between_the_chunks_of_a_waiting_prompt(model):
    """A long prompt arriving mid-answer is prefilled in chunks with a burst of the decoding rows between
    chunks (not one token per chunk), and both answers still equal greedy decoding."""
    engine = Engine(model, block_size=16, num_blocks=64)
    scheduler = Scheduler(engine, max_context=256, max_batch_tokens=16, decode_steps=4)
    gen = torch.Generator().manual_seed(12)
    short, long = (torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 60))
    first, second = Request(short, SamplingParams(max_new_tokens=30)), Request(long, SamplingParams(max_new_tokens=6))
    scheduler.submit(first)
    scheduler.step()  # the short prompt, and its first token
    scheduler.submit(second)
    kinds = []
    while second.first_token_at is None:
        before = scheduler.stats.step_kinds.get("burst", [0])[0]
        scheduler.step()
        kinds.append("burst" if scheduler.stats.step_kinds.get("burst", [0])[0] > before else "mixed")
    assert kinds == ["burst", "mixed"] * 4  # 60 prompt tokens: 4 chunks of <= 15 next to one decode row each
    assert len(first.outputs[0]) == 1 + 4 * (4 + 1)  # a burst of 4 before each chunk, a token beside it
    drain(scheduler, [first, second])
    assert first.outputs[0] == greedy_reference(model, short, 30)
    assert second.outputs[0] == greedy_reference(model, long, 6)
    assert scheduler.pool.used == 0 and scheduler.reserved_blocks == 0
