import pytest
import torch

from runtime.engine import Engine, PromptLookupDraft, SamplingParams, lookup_continuation, probabilities
from runtime.kv_cache import BlockPool, OutOfBlocks, Sequence
from runtime.paged_decoder import PagedDecoder
from tests.conftest import make_tiny_llama

GEN = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(3, 512, (n,), generator=GEN).tolist() for n in (5, 17, 9, 33, 1, 24, 16, 40)]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def test_paged_logits_match_transformers():
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2)
    runner = PagedDecoder(model, block_size=4, num_blocks=64)
    seq = Sequence(PROMPTS[3][:20])
    ours = runner.forward([seq], last_only=False)[0]
    ref = model(torch.tensor([seq.tokens])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    seq.tokens += [7, 8, 9]  # incremental: only the three new tokens run, attending to the cache
    step = runner.forward([seq], last_only=False)[0]
    torch.testing.assert_close(step, model(torch.tensor([seq.tokens])).logits[0, -3:], rtol=1e-4, atol=1e-4)


def test_batched_greedy_equals_transformers_generate():
    model = make_tiny_llama(layers=2, seed=1)
    outputs, stats = Engine(model, block_size=8, num_blocks=128).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out == hf_greedy(model, prompt, 12)
    assert stats.new_tokens == 8 * 12


def test_prefix_blocks_are_shared_and_evicted_when_needed():
    model = make_tiny_llama(layers=1)
    engine = Engine(model, block_size=4, num_blocks=16)
    shared = PROMPTS[7][:32]
    first, s1 = engine.generate([shared + [5]], SamplingParams(max_new_tokens=3))
    second, s2 = engine.generate([shared + [6]], SamplingParams(max_new_tokens=3))
    assert s1.prefix_hit_blocks == 0 and s2.prefix_hit_blocks == 8
    assert second[0] == hf_greedy(model, shared + [6], 3)
    assert engine.pool.used == 0  # everything released; cached blocks are evictable
    big, _ = engine.generate([PROMPTS[5] * 2 + [1]], SamplingParams(max_new_tokens=4))  # needs 13 blocks
    assert big[0] == hf_greedy(model, PROMPTS[5] * 2 + [1], 4)
    pool = BlockPool(2, 4, 1, 1, 2)
    pool.allocate()
    pool.allocate()
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_speculative_greedy_equals_target_and_self_draft_accepts_all():
    target, draft = make_tiny_llama(layers=2, seed=1), make_tiny_llama(layers=1, seed=2)
    t_engine, d_engine = Engine(target, block_size=4, num_blocks=128), Engine(draft, block_size=4, num_blocks=128)
    for prompt in PROMPTS[:4]:
        out, stats = t_engine.speculative(d_engine, prompt, SamplingParams(max_new_tokens=15), k=3)
        assert out == hf_greedy(target, prompt, 15)
        assert stats.target_steps < 15 or stats.acceptance_rate == 0
    same = Engine(target, block_size=4, num_blocks=128)
    out, stats = t_engine.speculative(same, PROMPTS[1], SamplingParams(max_new_tokens=16), k=4, adaptive=True)
    assert out == hf_greedy(target, PROMPTS[1], 16)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_step > 4
    assert t_engine.pool.used == 0 and d_engine.pool.used == 0


def _first_token_counts(t_engine, d_engine, prompt, params, runs, use_draft_only=False):
    counts = torch.zeros(512)
    for seed in range(runs):
        p = SamplingParams(max_new_tokens=1, temperature=params.temperature, top_k=params.top_k, seed=seed)
        if use_draft_only:
            (out,), _ = d_engine.generate([prompt], p)
        else:
            out, _ = t_engine.speculative(d_engine, prompt, p, k=2)
        counts[out[0]] += 1
    return counts


def test_speculative_sampling_matches_target_distribution():
    from scipy.stats import chi2

    target, draft = make_tiny_llama(layers=2, seed=1), make_tiny_llama(layers=1, seed=5)
    t_engine, d_engine = Engine(target, block_size=4, num_blocks=64), Engine(draft, block_size=4, num_blocks=64)
    prompt = PROMPTS[2]
    params = SamplingParams(temperature=1.0, top_k=6)
    with torch.no_grad():
        p = probabilities(target(torch.tensor([prompt])).logits[0, -1], params)
    support = p > 0
    assert p.max() < 0.6 and int(support.sum()) == 6
    runs = 1500

    def statistic(counts):
        expected = p[support] * runs
        assert counts[~support].sum() == 0 or True
        observed = counts[support]
        outside = counts[~support].sum()
        return float(((observed - expected) ** 2 / expected).sum() + outside * 1e3)

    critical = chi2.ppf(0.999, int(support.sum()) - 1)
    assert statistic(_first_token_counts(t_engine, d_engine, prompt, params, runs)) < critical
    # the test has power: sampling from the draft alone (no rejection rule) is caught
    assert statistic(_first_token_counts(t_engine, d_engine, prompt, params, runs, use_draft_only=True)) > critical


def test_lookup_continuation_takes_the_latest_longest_match():
    assert lookup_continuation([1, 2, 3, 4, 5, 2, 3], k=3, max_ngram=3, min_ngram=1) == [4, 5, 2]
    assert lookup_continuation([7, 8, 1, 7, 8, 2, 9, 7, 8], k=2, max_ngram=2, min_ngram=1) == [2, 9]
    assert lookup_continuation([9, 1, 5, 1, 6, 1], k=4, max_ngram=3, min_ngram=1) == [6, 1]  # n = 1, latest
    assert lookup_continuation([1, 2, 3], k=4, max_ngram=3, min_ngram=1) == []
    assert lookup_continuation([1, 2, 1], k=4, max_ngram=3, min_ngram=2) == []


def test_prompt_lookup_greedy_equals_target():
    target = make_tiny_llama(layers=2, seed=1)
    engine = Engine(target, block_size=4, num_blocks=128)
    accepted = 0
    for prompt in PROMPTS[:4]:
        prompt = prompt + prompt[:6]  # a repeat, so that lookups find something
        out, stats = engine.speculative(PromptLookupDraft(3), prompt, SamplingParams(max_new_tokens=20), k=4)
        assert out == hf_greedy(target, prompt, 20)
        accepted += stats.accepted
    assert accepted > 0 and engine.pool.used == 0


def test_prompt_lookup_sampling_matches_target_distribution():
    """The one-hot draft's rejection rule: accept with p(token), else resample without it."""
    from scipy.stats import chi2

    target = make_tiny_llama(layers=2, seed=1)
    engine = Engine(target, block_size=4, num_blocks=64)
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = [60, 50, 50, *range(100, 110), 60, 50]  # the 2-gram (60, 50) recurs: the lookup proposes 50
    (x,) = lookup_continuation(prompt, 1, 3, 1)
    with torch.no_grad():
        p = probabilities(target(torch.tensor([prompt])).logits[0, -1], params)
    assert x == 50 and 0.2 < p[x] < 0.6  # a likely, not certain, proposal: both branches of the rule run
    runs = 1500
    counts = torch.zeros(512)
    for seed in range(runs):
        out, _ = engine.speculative(PromptLookupDraft(3), prompt, SamplingParams(1, 1.0, top_k=6, seed=seed), k=2)
        counts[out[0]] += 1
    support = p > 0

    def statistic(c):
        expected = p[support] * runs
        return float(((c[support] - expected) ** 2 / expected).sum() + c[~support].sum() * 1e3)

    critical = chi2.ppf(0.999, int(support.sum()) - 1)
    assert statistic(counts) < critical
    always_accepted = torch.zeros(512)
    always_accepted[x] = runs
    assert statistic(always_accepted) > critical  # a rule that kept every proposal would be caught


@torch.no_grad()
def test_early_exit_emits_the_exit_models_confident_tokens_and_the_targets_others():
    """Lossy early exit: a token whose exit-model probability reaches the threshold comes from the exit model,
    every other from the target, which has caught up on the exited tokens (its answer equals a fresh full
    forward over everything emitted so far)."""
    from tests.conftest import greedy_reference

    target, exit_model = make_tiny_llama(layers=2, seed=1), make_tiny_llama(layers=1, seed=2)
    prompt, n = PROMPTS[2], 16
    engine, exit_engine = Engine(target, block_size=4, num_blocks=64), Engine(exit_model, block_size=4, num_blocks=64)
    params = SamplingParams(max_new_tokens=n)

    never, stats = engine.early_exit(exit_engine, prompt, params, threshold=1.01)
    assert never == greedy_reference(target, prompt, n) and stats.exited == 0 and stats.target_steps == n - 1
    always, stats = engine.early_exit(exit_engine, prompt, params, threshold=1e-9)
    assert always == never[:1] + greedy_reference(exit_model, prompt + never[:1], n - 1) and stats.target_steps == 0

    def confidence(ids):
        return torch.softmax(exit_model(torch.tensor([ids])).logits[0, -1], -1).max().item()
    ranked = sorted(confidence(prompt + never[:i]) for i in range(1, n))
    threshold = (ranked[n // 2] + ranked[n // 2 + 1]) / 2  # between two confidences: no rounding at the edge
    out, stats = engine.early_exit(exit_engine, prompt, params, threshold)
    exited = 0
    for i in range(1, n):
        context = prompt + out[:i]
        model = exit_model if confidence(context) >= threshold else target
        exited += model is exit_model
        assert out[i] == model(torch.tensor([context])).logits[0, -1].argmax().item(), i
    assert stats.exited == exited and 0 < exited < n - 1 and stats.target_steps == n - 1 - exited
    assert all(c == 0 for c in engine.pool.refcount + exit_engine.pool.refcount)  # both sequences released
    with pytest.raises(ValueError, match="greedy"):
        engine.early_exit(exit_engine, prompt, SamplingParams(temperature=0.7), 0.5)


def test_lookup_first_draft_mixes_both_drafters_and_keeps_greedy_exact():
    """Prompt lookup where the context recurs, the model draft elsewhere: the target's greedy output either way,
    and the model draft's cache follows the lookup tokens the target accepted."""
    from runtime.engine import LookupFirstDraft, ModelDraft
    from tests.conftest import greedy_reference

    target, small = make_tiny_llama(layers=2, seed=1), make_tiny_llama(layers=1, seed=2)
    engine = Engine(target, block_size=4, num_blocks=128)
    prompt = PROMPTS[3][:12] * 3  # repeats: lookup finds matches, and the answer may copy them
    expected = greedy_reference(target, prompt, 24)
    for k, lookup_k in ((2, None), (1, 3)):
        drafter = LookupFirstDraft(PromptLookupDraft(3, min_ngram=2), ModelDraft(Engine(small, block_size=4, num_blocks=128)),
                                   lookup_k)
        out, stats = engine.speculative(drafter, prompt, SamplingParams(max_new_tokens=24), k)
        assert out == expected
        assert drafter.cycles["lookup"] > 0 and drafter.cycles["model"] > 0, drafter.cycles
        assert stats.proposed > 0


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a window of 6 that the tree's depth crosses
@torch.no_grad()
def test_tree_pass_scores_every_node_as_its_own_branch_would(family):
    """Each node of a draft tree gets the logits of a plain pass over prefix + its ancestors + itself, and a
    leaf's K/V moved into place are what a plain pass writes there."""
    from runtime.engine import accept_tree
    from tests.conftest import make_tiny_family

    model = make_tiny_family(family)
    runner = PagedDecoder(model, block_size=4, num_blocks=64)
    prompt = PROMPTS[1][:9]
    seq = Sequence(list(prompt))
    runner.forward([seq])
    nodes = [11, 12, 13, 21, 22, 31]
    parents = [-1, 0, 1, -1, 3, 1]  # a chain 11-12-13; 21-22 beside it from the root; leaf 31 beside 13
    seq.tokens += nodes
    logits = runner.forward_tree(seq, parents)
    for i in range(len(nodes)):
        branch, at = [], i
        while at >= 0:
            branch.insert(0, nodes[at])
            at = parents[at]
        torch.testing.assert_close(logits[i], model(torch.tensor([prompt + branch])).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)
    # the target's argmaxes: after the prefix, then after each node; a branch follows them from the root
    assert accept_tree(nodes, parents, [11, 12, 31, 0, 0, 0, 0]) == ([0, 1, 5], 0)
    assert accept_tree(nodes, parents, [12, 13, 31, 0, 0, 0, 0]) == ([], 12)  # 12 is no child of the root
    assert accept_tree(nodes, parents, [21, 0, 0, 0, 22, 0, 0]) == ([3, 4], 0)
    base = len(prompt)  # keep branch 11-12-31: 31's K/V (node 5) move to position base + 2
    runner.pool.move(seq, base + 5, base + 2)
    runner.pool.truncate(seq, base + 3)
    seq.tokens[base + 2] = 31
    plain = Sequence(prompt + [11, 12, 31])
    fresh = PagedDecoder(model, block_size=4, num_blocks=64)
    fresh.forward([plain])
    for layer in range(len(model.model.layers)):
        torch.testing.assert_close(runner.pool.read(layer, runner.pool.slots(seq, 0, base + 3)),
                                   fresh.pool.read(layer, fresh.pool.slots(plain, 0, base + 3)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="parents"):
        seq.tokens += [1, 2]
        runner.forward_tree(seq, [-1, 1])
