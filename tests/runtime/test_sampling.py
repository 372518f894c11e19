"""The batch sampler: each row's distribution is `engine.probabilities`' for its settings, draws follow it
(chi-square, with a negative control), and a seeded row's draws do not depend on what shares its batch."""

import pytest
import torch
from scipy.stats import chisquare

from runtime.engine import Engine, SamplingParams, probabilities
from runtime.sampling import filtered_probabilities, sample_rows, uniform_noise
from runtime.scheduler import Request, Scheduler
from tests.conftest import make_tiny_llama

SETTINGS = [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.9, 20, 0.5), (2.0, 1, 1.0), (1.0, 0, 1.0)]


def test_each_row_gets_the_single_row_distribution():
    logits = torch.randn(len(SETTINGS), 97, generator=torch.Generator().manual_seed(0)) * 3
    temps, ks, ps = (list(x) for x in zip(*SETTINGS, strict=True))
    got = filtered_probabilities(logits, temps, ks, ps)
    for row, (t, k, p) in enumerate(SETTINGS):
        want = probabilities(logits[row], SamplingParams(temperature=t, top_k=k, top_p=p))
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-6)


def test_noise_is_a_function_of_seed_counter_and_column_only():
    seeds, counters = [5, 2**62 + 3, 5, 11], [0, 7, 1, 0]
    batch = uniform_noise(torch.tensor(seeds), torch.tensor(counters), 1000)
    assert float(batch.min()) > 0.0 and float(batch.max()) < 1.0
    for i in range(4):
        torch.testing.assert_close(uniform_noise(torch.tensor(seeds[i:i + 1]), torch.tensor(counters[i:i + 1]),
                                                 1000)[0], batch[i], rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[3])  # counter and seed both key it
    if torch.cuda.is_available():  # the same bits on the GPU
        torch.testing.assert_close(uniform_noise(torch.tensor(seeds).cuda(), torch.tensor(counters).cuda(),
                                                 1000).cpu(), batch, rtol=0, atol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 6, 1.0), (1.2, 0, 0.7)])
def test_draws_follow_the_distribution_and_a_wrong_one_is_rejected(temperature, top_k, top_p):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(1)) * 1.5
    draws = 20000
    tokens = sample_rows(logits.expand(draws, -1), [temperature] * draws, [top_k] * draws, [top_p] * draws,
                         [1234] * draws, list(range(draws)))
    counts = torch.bincount(tokens, minlength=12).double()
    expected = probabilities(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside top-k / top-p
    assert chisquare(counts[support], expected[support] / expected[support].sum() * draws).pvalue > 1e-3
    wrong = probabilities(logits, SamplingParams(temperature=temperature * 1.5, top_k=top_k, top_p=top_p)).double()
    assert chisquare(counts[support], wrong[support] / wrong[support].sum() * draws).pvalue < 1e-6  # negative control


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    tokens = sample_rows(logits, [0.0, 1.0, 0.0], [0, 0, 0], [1.0, 1.0, 1.0], [1, 2, 3], [0, 0, 0])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_seeded_request_draws_the_same_tokens_in_any_batch_composition():
    model = make_tiny_llama(vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    prompt = list(range(3, 30))

    def run(others: list[list[int]], first: bool) -> list[int]:
        scheduler = Scheduler(Engine(model, block_size=8, num_blocks=128), max_context=256, max_batch_tokens=64)
        mine = Request(prompt, params)
        rest = [Request(p, SamplingParams(max_new_tokens=9, temperature=0.7, top_k=9)) for p in others]
        for r in ([mine] + rest) if first else (rest + [mine]):
            scheduler.submit(r)
        while any(r.finished < r.n for r in [mine] + rest):
            scheduler.step()
        return mine.outputs[0]

    alone = run([], True)
    gen = torch.Generator().manual_seed(3)
    others = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 40, 17)]
    assert run(others, True) == alone and run(others[1:], False) == alone
    params.seed = 43
    assert run([], True) != alone
