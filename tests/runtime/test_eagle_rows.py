import pytest
import torch

from runtime.eagle import EagleDraft, new_head
from runtime.eagle_rows import HeadCache, propose_greedy
from runtime.engine import Engine, SamplingParams
from tests.conftest import make_tiny_family, make_tiny_llama


def hf_states(head, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The head's final-norm states at every position from its HF modules, whole sequence, no cache."""
    with torch.no_grad():
        return head(features[None], ids[None])[0][0]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_rows_in_pieces_equal_the_hf_modules_on_the_whole_sequence(model_type):
    """Three sequences' entries fed in pieces of different lengths (padding, a cache that grows in slots
    and positions) give each position the state the HF modules give on the whole sequence."""
    target = make_tiny_family(model_type, vocab_size=200, seed=3)
    head = new_head(target).eval()
    torch.manual_seed(0)
    lengths = [13, 5, 9]
    feats = [torch.randn(n, 64) for n in lengths]
    ids = [torch.randint(0, 200, (n,)) for n in lengths]
    cache = HeadCache(head, slots=1, positions=4)
    slots = [cache.take() for _ in lengths]
    assert sorted(slots) == [0, 1, 2] and cache.scratch >= 3
    pieces = [[4, 6, 3], [1, 1, 3], [2, 7, 0]]  # per sequence, per call (0: not in that call)
    done = [0, 0, 0]
    for call in range(3):
        members = [i for i in range(3) if pieces[i][call]]
        states, _ = cache.rows([slots[i] for i in members],
                               [feats[i][done[i]:done[i] + pieces[i][call]] for i in members],
                               [ids[i][done[i]:done[i] + pieces[i][call]].tolist() for i in members],
                               [done[i] for i in members])
        for row, i in enumerate(members):
            done[i] += pieces[i][call]
            expected = hf_states(head, feats[i][:done[i]], ids[i][:done[i]])[-1]
            torch.testing.assert_close(states[row], expected, rtol=1e-4, atol=1e-4)


def test_greedy_proposals_together_equal_each_alone():
    target = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False, seed=4)
    head = new_head(target, vocab_ids=torch.arange(0, 300, 3)).eval()
    prompts = [[5, 17, 123, 9, 250, 31, 77], [3, 4], [200, 201, 202, 203, 8, 8, 8, 19]]

    def drafts(cache_for):
        engine = Engine(target, block_size=4, num_blocks=64)
        engine.runner.keep_features = True
        out = []
        for prompt in prompts:
            engine.generate([prompt], SamplingParams(max_new_tokens=1))  # leaves the prompt's features
            draft = EagleDraft(head, engine.runner, cache_for())
            draft.begin(prompt, rows=engine.runner.features[0])
            draft.tokens.append(7)  # the target's first token
            out.append(draft)
        return out

    shared = HeadCache(head, slots=2)
    together_drafts = drafts(lambda: shared)
    second = together_drafts[1]  # position 0 entered: its catch-up is one entry, the others' whole prompts
    # (a pass of their own)
    second.cache.rows([second.slot], [second.features[:1]], [second.tokens[1:2]], [0])
    second.entries = 1
    together = propose_greedy(together_drafts, [3, 1, 2])
    alone = [d.propose(3, SamplingParams(), None)[0] for d in drafts(lambda: None)]
    assert together == [alone[0], alone[1][:1], alone[2][:2]]
    assert all(t % 3 == 0 for row in together for t in row)  # the reduced vocabulary's ids, mapped back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_graphed_passes_equal_eager_ones():
    """Padded to a bucket of sequences and to the graph's width, replayed: the eager pass's states, tokens
    and K/V, sequence by sequence."""
    target = make_tiny_llama(vocab_size=300, hidden=96, layers=3, heads=6, kv_heads=2, tie=False, seed=4).cuda()
    head = new_head(target).eval()
    torch.manual_seed(0)
    eager, graphed = HeadCache(head, slots=5, positions=64), HeadCache(head, slots=5, positions=64, graph_width=3)
    for cache in (eager, graphed):
        for _ in range(5):
            cache.take()
    for counts in ([3, 1, 2], [1, 1, 1, 1, 1], [2, 3, 1]):
        feats = [torch.randn(c, 96, device="cuda") for c in counts]
        ids = [torch.randint(0, 300, (c,)).tolist() for c in counts]
        starts = [5 * len(counts) + i for i in range(len(counts))]
        slots = list(range(len(counts)))
        (s1, t1), (s2, t2) = (c.rows(slots, feats, ids, starts) for c in (eager, graphed))
        torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)
        assert t1.tolist() == t2.tolist()
    assert sorted(graphed.graphs) == [(4, 3), (8, 1)]  # 3 sequences padded to 4, widths 1..3 to 3; 5 to 8
    torch.testing.assert_close(eager.k[:, :5], graphed.k[:, :5])
