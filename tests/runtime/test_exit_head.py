"""The KV-sharing early-exit draft: greedy output = the target's, and the target's cache as plain decoding leaves it."""

import pytest
import torch

from runtime.engine import Engine, SamplingParams
from runtime.exit_head import exit_logits, new_exit_head, self_speculative
from runtime.kv_cache import Sequence
from tests.conftest import greedy_reference, make_tiny_llama

PROMPTS = [[5, 17, 123, 9, 250, 31, 77], [3], [200, 201, 202, 203, 8, 8, 8, 19, 44, 45, 46, 47, 48]]


def target_and_exit(identity_after_exit: bool = False, seed: int = 3):
    target = make_tiny_llama(vocab_size=300, hidden=64, layers=4, heads=4, kv_heads=2, seed=seed).eval()
    if identity_after_exit:  # layers 2.. add nothing: the exit at layer 2 is the target itself
        for layer in target.model.layers[2:]:
            torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
            torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    head = new_exit_head(target, 2)
    if not identity_after_exit:
        torch.manual_seed(0)  # a slightly wrong exit: some proposals accepted, some not
        torch.nn.init.normal_(head.down.weight, std=0.02)
    return target, head.eval()


@pytest.mark.parametrize("k", [1, 3])
def test_self_speculative_greedy_equals_target(k):
    target, head = target_and_exit()
    engine = Engine(target, block_size=4, num_blocks=128)
    proposed = accepted = 0
    for prompt in PROMPTS:
        out, stats = self_speculative(engine, head, prompt, SamplingParams(max_new_tokens=16), k)
        assert out == greedy_reference(target, prompt, 16)
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert proposed > 0 and accepted < proposed
    assert engine.pool.used == 0  # the sequence is released


def test_an_exact_exit_is_always_accepted():
    """Positive control: with the layers after the exit doing nothing, the draft is the target."""
    target, head = target_and_exit(identity_after_exit=True)
    out, stats = self_speculative(Engine(target, block_size=4, num_blocks=128), head, PROMPTS[0],
                                  SamplingParams(max_new_tokens=13), 3)
    assert out == greedy_reference(target, PROMPTS[0], 13)
    assert stats.accepted == stats.proposed > 0 and stats.target_steps == 3  # 1 + 3 x (3 + 1) = 13


def test_target_cache_is_what_plain_decoding_leaves(monkeypatch):
    """Every layer's K/V at every kept position equals a plain pass over the same tokens: the draft wrote the
    first layers' entries as the target would, verification the rest, and rejected tails were overwritten."""
    target, head = target_and_exit()
    engine = Engine(target, block_size=4, num_blocks=128)
    seen = {}
    free = engine.pool.free_sequence

    def capture(seq):  # just before the engine releases the sequence: its cache, every layer
        slots = engine.pool.slots(seq, 0, len(seq.tokens))
        seen["tokens"] = list(seq.tokens)
        seen["kv"] = [engine.pool.read(li, slots) for li in range(4)]
        free(seq)
    monkeypatch.setattr(engine.pool, "free_sequence", capture)
    out, stats = self_speculative(engine, head, PROMPTS[2], SamplingParams(max_new_tokens=20), 3)
    assert 0 < stats.accepted < stats.proposed  # rejected tails were written and then overwritten
    kept = seen["tokens"][len(PROMPTS[2]):]  # may run past the token budget: accepted drafts beyond it
    assert kept[:len(out)] == out[:len(kept)]
    plain = Engine(target, block_size=4, num_blocks=128)
    seq = Sequence(seen["tokens"])
    plain.runner.forward([seq])
    slots = plain.pool.slots(seq, 0, len(seq.tokens))
    for li in range(4):
        for ours, theirs in zip(seen["kv"][li], plain.pool.read(li, slots), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_exit_starts_as_the_targets_own_head_on_layer_l():
    target, _ = target_and_exit()
    head = new_exit_head(target, 2)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        hidden = target.model(ids, output_hidden_states=True).hidden_states[2]
        expected = target.lm_head(target.model.norm(hidden))
        torch.testing.assert_close(exit_logits(head, target, hidden), expected)
    with pytest.raises(ValueError, match="exit layer"):
        new_exit_head(target, 4)
    with pytest.raises(ValueError, match="greedy"):
        self_speculative(Engine(target), head, PROMPTS[0], SamplingParams(temperature=0.5), 2)


def test_lossy_exit_emits_the_exits_confident_tokens_and_the_targets_others():
    """`exit_early`: where the exit's top probability reaches p, its token; elsewhere the target's, computed after
    its later layers caught up on the exited tokens (equal to a fresh full forward over everything so far)."""
    from runtime.exit_head import exit_early

    target, head = target_and_exit()
    engine = Engine(target, block_size=4, num_blocks=128)
    prompt, n = PROMPTS[0], 16
    params = SamplingParams(max_new_tokens=n)

    def exit_at(ids):  # the exit's distribution after `ids`, from the target's own layer-L state
        with torch.no_grad():
            hidden = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[head.exit_layer]
            return torch.softmax(exit_logits(head, target, hidden)[0, -1], -1)

    never, stats = exit_early(engine, head, prompt, params, 1.01)
    assert never == greedy_reference(target, prompt, n) and stats.exited == 0
    always, stats = exit_early(engine, head, prompt, params, 1e-9)
    assert stats.exited == n - 1 and stats.target_steps == 0
    assert all(always[i] == int(exit_at(prompt + always[:i]).argmax()) for i in range(1, n))
    ranked = sorted(float(exit_at(prompt + never[:i]).max()) for i in range(1, n))
    threshold = (ranked[n // 2] + ranked[n // 2 + 1]) / 2
    out, stats = exit_early(engine, head, prompt, params, threshold)
    exited = 0
    for i in range(1, n):
        p = exit_at(prompt + out[:i])
        if float(p.max()) >= threshold:
            exited += 1
            assert out[i] == int(p.argmax()), i
        else:
            with torch.no_grad():
                assert out[i] == int(target(torch.tensor([prompt + out[:i]])).logits[0, -1].argmax()), i
    assert stats.exited == exited and 0 < exited < n - 1 and engine.pool.used == 0
