import pytest
import torch

from runtime.eagle import EagleDraft, load_head, new_head
from runtime.engine import Engine, SamplingParams, probabilities
from runtime.static_decode import StaticDecoder
from runtime.static_speculative import StaticEagleSpeculator
from tests.conftest import greedy_reference, make_tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [[5, 17, 123, 9, 250, 31, 77], [3], [200, 201, 202, 203, 8, 8, 8, 19, 44, 45, 46, 47, 48]]


def target_and_head(vocab_ids=None):
    target = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False, seed=4)
    return target, new_head(target, vocab_ids=vocab_ids).eval()


@pytest.mark.parametrize("k", [1, 3])
def test_engine_eagle_greedy_equals_target(k):
    target, head = target_and_head()
    engine = Engine(target, block_size=4, num_blocks=128)
    proposed = accepted = 0
    for prompt in PROMPTS:
        out, stats = engine.speculative(EagleDraft(head, engine.runner), prompt, SamplingParams(max_new_tokens=20), k)
        assert out == greedy_reference(target, prompt, 20)
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert 0 < accepted < proposed  # both branches of the acceptance ran
    assert engine.pool.used == 0 and not engine.runner.keep_features


def test_engine_eagle_after_a_prefix_cache_hit():
    """The prompt's blocks come from the prefix cache: the head still sees every prompt feature."""
    target, head = target_and_head()
    engine = Engine(target, block_size=4, num_blocks=128)
    prompt = PROMPTS[2]
    engine.generate([prompt], SamplingParams(max_new_tokens=2))  # leaves the prompt's full blocks cached
    out, cold = engine.speculative(EagleDraft(head, engine.runner), prompt, SamplingParams(max_new_tokens=16), 3)
    fresh = Engine(target, block_size=4, num_blocks=128)
    again, stats = fresh.speculative(EagleDraft(head, fresh.runner), prompt, SamplingParams(max_new_tokens=16), 3)
    assert out == again == greedy_reference(target, prompt, 16)
    assert (cold.accepted, cold.proposed) == (stats.accepted, stats.proposed)  # the same proposals: same context


def test_engine_eagle_with_reduced_vocabulary():
    target, head = target_and_head(vocab_ids=torch.arange(0, 300, 2))  # the even ids only
    engine = Engine(target, block_size=4, num_blocks=128)
    out, stats = engine.speculative(EagleDraft(head, engine.runner), PROMPTS[0], SamplingParams(max_new_tokens=16), 3)
    assert out == greedy_reference(target, PROMPTS[0], 16)
    assert stats.proposed > 0


def test_engine_eagle_sampling_matches_target_distribution():
    """The second token (the first the head drafts), given the first: the target's distribution, by chi-square;
    the head's own distribution is rejected by the same test (its power)."""
    from scipy.stats import chi2

    target, head = target_and_head()
    engine = Engine(target, block_size=4, num_blocks=64)
    prompt = PROMPTS[0]
    params = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=3)
    seconds: dict[int, list[int]] = {}
    for seed in range(2000):
        p = SamplingParams(2, 1.0, top_k=3, seed=seed)
        first, second = engine.speculative(EagleDraft(head, engine.runner), prompt, p, k=2)[0]
        seconds.setdefault(first, []).append(second)
    first, draws = max(seconds.items(), key=lambda kv: len(kv[1]))
    counts = torch.bincount(torch.tensor(draws), minlength=300).float()
    with torch.no_grad():
        p = probabilities(target(torch.tensor([prompt + [first]])).logits[0, -1], params)
        features = target.model(torch.tensor([prompt])).last_hidden_state
        _, draft_logits = head(features[:, -1:], torch.tensor([[first]]), torch.tensor([[len(prompt) - 1]]))
        q = probabilities(draft_logits[0, -1], params)
    support = p > 0

    def statistic(expected_probs):
        expected = expected_probs[support] * len(draws)
        outside = counts[~support].sum()
        return float(((counts[support] - expected) ** 2 / expected.clamp_min(1e-9)).sum() + outside * 1e3)

    critical = chi2.ppf(0.999, int(support.sum()) - 1)
    assert len(draws) > 500
    assert statistic(p) < critical
    assert statistic(q) > critical


@pytest.mark.parametrize("k", [1, 2, 4])
def test_static_eagle_greedy_equals_target(k):
    target, head = target_and_head()
    spec = StaticEagleSpeculator(StaticDecoder(target, 1, 64), head, k)
    for prompt in PROMPTS:
        assert spec.generate(prompt, 20) == greedy_reference(target, prompt, 20)
    assert 0 < spec.stats.acceptance_rate < 1 or k == 1
    stop = greedy_reference(target, PROMPTS[0], 20)[7]
    expected = greedy_reference(target, PROMPTS[0], 20)
    assert spec.generate(PROMPTS[0], 20, stop_ids=(stop,)) == expected[:expected.index(stop) + 1]


def test_static_eagle_matches_engine_acceptance():
    """Both drafting paths run the same head on the same features: the same proposals, the same acceptance."""
    target, head = target_and_head()
    engine = Engine(target, block_size=4, num_blocks=128)
    spec = StaticEagleSpeculator(StaticDecoder(target, 1, 64), head, 3)
    for prompt in PROMPTS:
        _, stats = engine.speculative(EagleDraft(head, engine.runner), prompt, SamplingParams(max_new_tokens=20), 3)
        spec.generate(prompt, 20)
        assert (spec.stats.accepted, spec.stats.cycles) == (stats.accepted, stats.target_steps)


def test_fused_static_eagle_equals_target_greedy():
    """The Triton path (the head's layer through the verify-attention kernel); CPU: interpreter."""
    pytest.importorskip("triton")
    target, head = target_and_head(vocab_ids=torch.arange(0, 300, 3))
    target, head = target.to(DEVICE), head.to(DEVICE)
    fused = StaticDecoder(target, 1, 48)
    fused.use_fused_kernels()
    spec = StaticEagleSpeculator(fused, head, 3)
    expected = greedy_reference(target, PROMPTS[0], 12)
    assert spec.generate(PROMPTS[0], 12, use_graph=False) == expected
    if DEVICE == "cuda":
        assert spec.generate(PROMPTS[0], 12, use_graph=True) == expected


def test_head_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import save_file

    target, head = target_and_head(vocab_ids=torch.arange(10, 200))
    with torch.no_grad():
        head.fc.weight.normal_(0, 0.05)
    save_file(head.trained_state(), str(tmp_path / "model.safetensors"))
    head.config.save_pretrained(tmp_path)
    loaded = load_head(tmp_path, target)
    features, tokens = torch.randn(1, 5, 96), torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        for a, b in zip(head(features, tokens), loaded(features, tokens), strict=True):
            torch.testing.assert_close(a, b)
    assert torch.equal(loaded.vocab_ids, torch.arange(10, 200))


def test_lookup_first_with_a_head_keeps_its_features_in_step():
    """Prompt lookup first, the head elsewhere: greedy = the target's, and after cycles of either kind the
    head's store holds the target's true feature of every position it knows (none shifted or missing)."""
    from runtime.engine import LookupFirstDraft, PromptLookupDraft

    target, head = target_and_head()
    engine = Engine(target, block_size=4, num_blocks=128)
    prompt = PROMPTS[2] * 2
    drafter = LookupFirstDraft(PromptLookupDraft(3, min_ngram=2), EagleDraft(head, engine.runner), lookup_k=3)
    out, stats = engine.speculative(drafter, prompt, SamplingParams(max_new_tokens=20), 2)
    assert out == greedy_reference(target, prompt, 20)
    assert drafter.cycles["lookup"] > 0 and drafter.cycles["model"] > 0, drafter.cycles
    known = drafter.model.known
    assert known > len(prompt) + 5
    with torch.no_grad():
        true = target.model(torch.tensor([(prompt + out)[:known]])).last_hidden_state[0]
    torch.testing.assert_close(drafter.model.features, true, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_engine_eagle_tree_greedy_equals_target(k):
    """A draft tree (the head's chain and two more candidates beside each token) verified in one pass: output
    equal to the target's greedy, with branches ending in a leaf among the accepted. The head proposes among
    the target's own output tokens (a reduced vocabulary), so its top three often hold the target's."""
    target, _ = target_and_head()
    refs = {tuple(p): greedy_reference(target, p, 24) for p in PROMPTS}
    vocab = sorted({t for out in refs.values() for t in out})
    head = new_head(target, vocab_ids=torch.tensor(vocab)).eval()
    engine = Engine(target, block_size=4, num_blocks=128)
    leaves = accepted = 0
    for prompt in PROMPTS:
        out, stats = engine.speculative(EagleDraft(head, engine.runner), prompt, SamplingParams(max_new_tokens=24),
                                        k, tree_width=3)
        assert out == refs[tuple(prompt)]
        leaves, accepted = leaves + stats.leaves_accepted, accepted + stats.accepted
    assert leaves > 0 and accepted > leaves  # leaves moved into place, and chain tokens accepted
    assert engine.pool.used == 0 and not engine.runner.keep_features
    with pytest.raises(ValueError, match="EAGLE"):
        engine.speculative(engine, PROMPTS[0], SamplingParams(max_new_tokens=4), k, tree_width=2)


def test_engine_eagle_confidence_drafts_fewer_tokens_and_stays_exact():
    """Drafting stops before a token the head is unsure of: fewer proposals, a higher share of them accepted
    (the head's probability tracks acceptance), the target's greedy output all the same. The head is fitted to
    the target's own continuations of the prompts, so it is sure of some tokens and not of others."""
    from train.distillation import OptimConfig
    from train.eagle import EagleModule

    target, head = target_and_head()
    with torch.no_grad():  # a peaked next-token distribution, as a trained model's (random weights give a flat one)
        target.lm_head.weight.mul_(30)  # (the head shares it)
    refs = {tuple(p): greedy_reference(target, p, 24) for p in PROMPTS}
    module = EagleModule(head, target, OptimConfig(lr=1e-2, warmup_steps=2, max_steps=60), kl_weight=1.0)
    ids = torch.tensor([(list(p) + out)[:25] for p, out in refs.items()])
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        module.losses(ids)["loss"].backward()
        opt.step()
    head.eval()
    engine = Engine(target, block_size=4, num_blocks=128)
    counts = {}
    for confidence in (0.0, 0.5):
        proposed = accepted = 0
        for prompt in PROMPTS:
            out, stats = engine.speculative(EagleDraft(head, engine.runner, min_confidence=confidence), prompt,
                                            SamplingParams(max_new_tokens=24), 3)
            assert out == refs[tuple(prompt)]
            proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        counts[confidence] = (proposed, accepted)
    (all_proposed, all_accepted), (sure_proposed, sure_accepted) = counts[0.0], counts[0.5]
    assert 0 < sure_proposed < all_proposed
    assert sure_accepted / sure_proposed > all_accepted / all_proposed
