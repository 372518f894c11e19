"""Next tokens for a whole batch in a few device ops: per-row temperature, top-k, top-p and seed.

The serving loop used to sample row by row on the host (a `torch.multinomial` per request with its
own CPU generator: a device-to-host copy of the logits per row). Here one call handles the batch
on the logits' device and returns tokens with one host synchronisation.

Randomness is counter-based: row r's uniform for vocabulary column c is a hash of (its seed, how
many tokens the row has generated, c), computed with integer tensor ops that give the same bits on
CPU and GPU. A seeded request therefore draws the same tokens whatever else shares its batch, in
whatever order. The draw is an exponential race, argmax_c p_c / E_c with E_c = -log(u_c), which
picks c with probability p_c (Gumbel-max in another form), so no cumulative sums or host loops.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2^32; the
    multipliers stay below 2^31, so no product overflows int64 and every shift is a logical one."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) float32 uniforms in (0, 1), a function of (seed, counter, column) only."""
    seeds, counters = seeds.long(), counters.long()
    base = _mix(_mix(seeds & M32) ^ ((seeds >> 32) & M32))
    base = _mix(base ^ (counters & M32))
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    bits = _mix(_mix((base[:, None] + cols[None, :] * 0x9E3779B1) & M32))
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def filtered_probabilities(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float]
                           ) -> torch.Tensor:
    """Per row, what `runtime.engine.probabilities` gives for one row: tempered logits, the top_k highest
    (ties at the k-th kept), then the smallest prefix of mass >= top_p; rows (B, V) float32. The
    settings come as host lists, so deciding what to compute costs no device synchronisation."""
    dev, vocab = logits.device, logits.shape[-1]
    temps = torch.tensor([t if t > 0 else 1.0 for t in temperature], device=dev)
    logits = logits.float() / temps[:, None]
    filter_k, filter_p = any(k > 0 for k in top_k), any(p < 1.0 for p in top_p)
    if not (filter_k or filter_p):
        return logits.softmax(-1)
    ordered, order = logits.sort(dim=-1, descending=True)
    if filter_k:
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=dev)
        ordered = ordered.masked_fill(ordered < ordered.gather(1, (k - 1)[:, None]), float("-inf"))
    sorted_p = ordered.softmax(-1)
    if filter_p:
        drop = (sorted_p.cumsum(-1) - sorted_p) > torch.tensor(top_p, device=dev)[:, None]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    return torch.zeros_like(sorted_p).scatter(-1, order, sorted_p)


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                seeds: list[int], counters: list[int]) -> torch.Tensor:
    """Next token per row of logits (B, V), on their device: the argmax where temperature <= 0, else a
    draw from the row's filtered distribution with uniforms keyed by (seed, counter)."""
    greedy = logits.argmax(-1)
    if all(t <= 0 for t in temperature):
        return greedy
    dev = logits.device
    probs = filtered_probabilities(logits, temperature, top_k, top_p)
    noise = uniform_noise(torch.tensor(seeds, device=dev), torch.tensor(counters, device=dev), logits.shape[-1])
    sampled = torch.tensor([t > 0 for t in temperature], device=dev)
    return torch.where(sampled, (probs / -noise.log()).argmax(-1), greedy)
