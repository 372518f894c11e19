import copy

import pytest
import torch

from runtime.static_decode import StaticDecoder
from runtime.static_speculative import StaticSpeculator
from tests.conftest import greedy_reference, make_tiny_llama, tiny_target_and_exit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_pair(noise: float = 0.4):
    """A target and a draft that agrees with it part of the time (its LM head perturbed)."""
    target = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        head = draft.lm_head.weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)) * head.std() * noise)
    return target, draft


PROMPT = [5, 17, 123, 9, 250, 31, 77]


@pytest.mark.parametrize("k", [1, 3, 4])
def test_speculative_greedy_equals_target_greedy(k):
    target, draft = tiny_pair()
    expected = greedy_reference(target, PROMPT, 24)
    spec = StaticSpeculator(StaticDecoder(target, 1, 64), StaticDecoder(draft, 1, 64), k)
    assert spec.generate(PROMPT, 24) == expected
    assert 0 < spec.stats.acceptance_rate < 1  # both branches of the acceptance ran
    assert spec.stats.new_tokens == 24
    assert spec.generate(PROMPT[:3], 10) == greedy_reference(target, PROMPT[:3], 10)  # state reset between calls


def test_smaller_draft_and_stop_token():
    target, _ = tiny_pair()
    draft = make_tiny_llama(vocab_size=300, hidden=64, layers=1, heads=4, kv_heads=2, seed=3, tie=False)
    expected = greedy_reference(target, PROMPT, 16)
    spec = StaticSpeculator(StaticDecoder(target, 1, 64), StaticDecoder(draft, 1, 64), 3)
    assert spec.generate(PROMPT, 16) == expected
    stop = expected[9]
    assert spec.generate(PROMPT, 16, stop_ids=(stop,)) == expected[:expected.index(stop) + 1]


def test_target_as_its_own_draft_accepts_every_token():
    target, _ = tiny_pair()
    spec = StaticSpeculator(StaticDecoder(target, 1, 64), StaticDecoder(target, 1, 64), 4)
    assert spec.generate(PROMPT, 21) == greedy_reference(target, PROMPT, 21)
    assert spec.stats.acceptance_rate == 1.0 and spec.stats.tokens_per_target_step == 5.0
    assert spec.stats.cycles == 4  # 1 token from the prefill, then 4 cycles of 5


def test_limits_are_checked():
    target, draft = tiny_pair()
    spec = StaticSpeculator(StaticDecoder(target, 1, 32), StaticDecoder(draft, 1, 32), 4)
    with pytest.raises(ValueError, match="static cache"):
        spec.generate(PROMPT, 22)  # 7 + 22 + 4 > 32
    with pytest.raises(ValueError, match="vocabulary"):
        StaticSpeculator(StaticDecoder(target, 1, 32), StaticDecoder(make_tiny_llama(vocab_size=200), 1, 32))


@pytest.mark.parametrize("small", ["gemv", "gemv-rows", "gemm"])
def test_fused_speculative_equals_target_greedy(small, monkeypatch):
    """The Triton path (verify attention over k + 1 tokens, either kernel for the k + 1 rows); CPU: interpreter."""
    pytest.importorskip("triton")
    from runtime import triton_decode

    monkeypatch.setitem(triton_decode.TILES, "small", (small,))
    target, draft = tiny_pair()
    expected = greedy_reference(target, PROMPT, 12)
    fused_target, fused_draft = StaticDecoder(target.to(DEVICE), 1, 48), StaticDecoder(draft.to(DEVICE), 1, 48)
    fused_target.use_fused_kernels()
    fused_draft.use_fused_kernels()
    spec = StaticSpeculator(fused_target, fused_draft, 3)
    assert spec.generate(PROMPT, 12, use_graph=False) == expected
    assert 0 < spec.stats.acceptance_rate < 1
    if DEVICE == "cuda":
        assert spec.generate(PROMPT, 12, use_graph=True) == expected


@pytest.mark.parametrize("fused", [False, True])
def test_static_prompt_lookup_equals_target_greedy(fused):
    """Prompt lookup on the static decoder (host proposals, one verify graph per proposal count)."""
    from runtime.static_speculative import StaticLookupSpeculator

    target, _ = tiny_pair()
    target = target.to(DEVICE)
    decoder = StaticDecoder(target, 1, 96)
    if fused:
        pytest.importorskip("triton")
        decoder.use_fused_kernels()
    spec = StaticLookupSpeculator(decoder, k=3)
    accepted = 0
    for prompt in (PROMPT + PROMPT[:5], PROMPT, [9] * 6):
        expected = greedy_reference(target, prompt, 24)
        assert spec.generate(prompt, 24) == expected
        accepted += spec.stats.accepted
        assert spec.stats.new_tokens == 24 and 0 <= spec.stats.acceptance_rate <= 1
        if DEVICE == "cuda":
            assert spec.generate(prompt, 24, use_graph=True) == expected
    assert accepted > 0  # the lookup found continuations the target agreed with
    stop = greedy_reference(target, PROMPT, 24)[10]
    expected = greedy_reference(target, PROMPT, 24)
    assert spec.generate(PROMPT, 24, stop_ids=(stop,)) == expected[:expected.index(stop) + 1]


@pytest.mark.skipif(DEVICE != "cuda", reason="a race between GPU programs: the interpreter runs them in order")
def test_fused_verify_graphs_equal_target_greedy_every_time():
    """The verify attention's KV-head programs once read the new tokens' `valid` flags before program 0 had
    written them, so graph replays dropped the new tokens from attention at random: repeat, with fresh and
    reused speculators, until a race would have shown."""
    from runtime.static_speculative import StaticLookupSpeculator

    target, _ = tiny_pair()
    target = target.to(DEVICE)
    prompts = (PROMPT + PROMPT[:5], PROMPT, [9] * 6)
    expected = [greedy_reference(target, p, 24) for p in prompts]
    for _ in range(10):
        for order in ((2,), (0, 1, 2), (2, 0, 1)):
            decoder = StaticDecoder(target, 1, 96)
            decoder.use_fused_kernels()
            spec = StaticLookupSpeculator(decoder, k=3)
            for i in order:
                assert spec.generate(list(prompts[i]), 24, use_graph=True) == expected[i]



EXIT_PROMPTS = [PROMPT, [3], [200, 201, 202, 203, 8, 8, 8, 19, 44, 45, 46, 47, 48]]


def exit_speculator(target, head, k: int, fused: bool, vocab_ids=None):
    from runtime.static_speculative import StaticExitSpeculator

    decoder = StaticDecoder(target.to(DEVICE), 1, 64)
    if fused:
        pytest.importorskip("triton")
        decoder.use_fused_kernels()
    return StaticExitSpeculator(decoder, head.to(DEVICE), k, vocab_ids)


@pytest.mark.parametrize(("k", "fused"), [(1, False), (3, False), (2, True)])
def test_static_exit_greedy_equals_target_and_leaves_its_cache(k, fused):
    """The KV-sharing exit on the static decoder (PyTorch layers, or the Triton kernels: on the CPU under the
    interpreter): greedy = the target's, and every layer's cache at every kept column = a plain prefill's."""
    target, head = tiny_target_and_exit()
    spec = exit_speculator(target, head, k, fused)
    proposed = accepted = 0
    prompts, n = (EXIT_PROMPTS[::2], 12) if fused else (EXIT_PROMPTS, 16)  # the interpreter is slow
    for prompt in prompts:
        out = spec.generate(prompt, n, use_graph=False)
        assert out == greedy_reference(target, prompt, n)
        proposed, accepted = proposed + spec.stats.cycles * k, accepted + spec.stats.accepted
    assert 0 < accepted < proposed  # both branches of the acceptance ran
    plain = StaticDecoder(target, 1, 64)
    kept = prompts[-1] + out[:-1]  # the last token is the next cycle's input: in no cache yet
    plain.prefill([kept], 1)
    for (k_ours, v_ours), (k_plain, v_plain) in zip(spec.target.cache(1), plain.cache(1), strict=True):
        torch.testing.assert_close(k_ours[:, :, :len(kept)], k_plain[:, :, :len(kept)], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v_ours[:, :, :len(kept)], v_plain[:, :, :len(kept)], rtol=1e-4, atol=1e-4)
    if DEVICE == "cuda":
        assert spec.generate(PROMPT, 16, use_graph=True) == greedy_reference(target, PROMPT, 16)


def test_static_exact_exit_is_always_accepted_and_vocab_subset():
    """Positive control (the layers after the exit add nothing: the exit is the target), then the same exit
    without one of the answer's tokens in its vocabulary: where the target says it, the exit cannot."""
    target, head = tiny_target_and_exit(after_exit=0.0)
    expected = greedy_reference(target, PROMPT, 13)
    spec = exit_speculator(target, head, 3, fused=False)
    assert spec.generate(PROMPT, 13) == expected
    assert spec.stats.accepted == 3 * spec.stats.cycles and spec.stats.cycles == 3  # 1 + 3 x 4
    subset = torch.tensor([t for t in range(300) if t != expected[5]])
    spec = exit_speculator(target, head, 3, fused=False, vocab_ids=subset)
    assert spec.generate(PROMPT, 13) == expected
    assert spec.stats.accepted < 3 * spec.stats.cycles
    head.exit_layer = 4
    with pytest.raises(ValueError, match="exit layer"):
        exit_speculator(target, head, 3, fused=False)
