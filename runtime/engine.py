"""The generation engine: batched prefill and decode over the paged cache, and speculative decoding.

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): the draft proposes k tokens, the
target scores them (plus one bonus position) in one pass; token i is accepted with probability
min(1, p_i / q_i), the first rejection is replaced by a sample from max(0, p - q) normalised.
Sampled output then has exactly the target's distribution; greedy output equals the target's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.kv_cache import Sequence
from runtime.paged_decoder import PagedDecoder


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    target_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    prefix_hit_blocks: int = 0
    exited: int = 0  # early exit: tokens the exit model emitted alone (no target pass)
    leaves_accepted: int = 0  # tree drafting: cycles whose accepted branch ended in a leaf beside the chain
    per_step_accepted: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_step(self) -> float:
        return self.new_tokens / self.target_steps if self.target_steps else 0.0


def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """OpenAI's logit bias and presence/frequency penalties over the tokens generated so far (not the prompt)."""
    if not params.adjusts_logits:
        return logits
    logits = logits.float().clone()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias, strict=True)
        logits[..., list(ids)] += torch.tensor(bias, device=logits.device)
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1])[: logits.shape[-1]]
        counts = counts.to(logits.device, torch.float32)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def token_logprobs(rows: torch.Tensor, tokens: list[int], top_n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """(log p(token), the top_n (id, log p) pairs) per row, from the model's own distribution (before any
    temperature, penalty or bias), as OpenAI-compatible servers report them."""
    logp = rows.float().log_softmax(-1)
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    if top_n <= 0:
        return [(c, []) for c in chosen]
    values, ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
    return [(c, list(zip(i, v, strict=True))) for c, i, v in zip(chosen, ids.tolist(), values.tolist(), strict=True)]


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution tokens are drawn from (one-hot at the argmax when greedy)."""
    logits = logits.float()
    if params.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The argmax when greedy, else a draw from the tempered / top-k / top-p distribution."""
    if params.temperature <= 0:
        return int(logits.argmax())
    return draw(probabilities(logits, params), generator)


def accept_greedy(tokens: list[int], argmaxes: list[int]) -> tuple[int, int]:
    """`accept_draft` under greedy decoding (p and q one-hot): the longest prefix of the draft's tokens the
    target's argmaxes (len(tokens) + 1 of them) agree with, and the target's token after it."""
    accepted = next((i for i, t in enumerate(tokens) if t != argmaxes[i]), len(tokens))
    return accepted, argmaxes[accepted]


def accept_tree(tokens: list[int], parents: list[int], argmaxes: list[int]) -> tuple[list[int], int]:
    """`accept_greedy` over a draft tree (parents[i]: the node before node i, -1 the last accepted token;
    argmaxes[0] the target's token after that one, argmaxes[i + 1] after node i): the branch the target's
    argmaxes follow (node indices) and the target's token after it."""
    branch, at = [], -1
    while True:
        want = argmaxes[at + 1]
        at = next((i for i, (t, p) in enumerate(zip(tokens, parents, strict=True)) if p == at and t == want), None)
        if at is None:
            return branch, want
        branch.append(at)


def accept_draft(ps: list[torch.Tensor], qs: list[torch.Tensor | None], tokens: list[int],
                 generator: torch.Generator | None) -> tuple[int, int]:
    """The exact rejection rule: (accepted draft tokens, the token that follows them).

    ps: len(tokens) + 1 target distributions, qs: the draft's, one per proposed token (None: a
    deterministic draft, q one-hot at the token).
    """
    for i, token in enumerate(tokens):
        p, q = ps[i], qs[i]
        if q is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        if torch.rand(1, generator=generator).item() < min(1.0, float(p[token] / q[token].clamp(min=1e-20))):
            continue
        residual = (p - q).clamp(min=0)
        return i, draw(residual / residual.sum() if residual.sum() > 0 else p, generator)
    return len(tokens), draw(ps[len(tokens)], generator)


class Engine:
    def __init__(self, model: torch.nn.Module, block_size: int = 16, num_blocks: int = 1024,
                 fused: bool | None = None):
        self.runner = PagedDecoder(model, block_size, num_blocks, fused)
        self.pool = self.runner.pool

    def _start(self, prompts: list[list[int]]) -> list[Sequence]:
        seqs = [Sequence(list(p)) for p in prompts]
        for s in seqs:
            if not s.tokens:
                raise ValueError("empty prompt")
            self.pool.admit(s)
        return seqs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], GenerationStats]:
        """Generate for a batch of prompts together (continuous decode over the active set)."""
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        seqs = self._start(prompts)
        stats.prefix_hit_blocks = sum(s.prefix_hits for s in seqs)
        start = time.perf_counter()
        logits = self.runner.forward(seqs, last_only=True)
        for s in seqs:
            self.pool.register_full_blocks(s)
        stats.prefill_s = time.perf_counter() - start
        outputs: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        start = time.perf_counter()
        while active:
            still = []
            for row, i in enumerate(active):
                token = next_token(logits[row][-1], params, gen)
                outputs[i].append(token)
                seqs[i].tokens.append(token)
                if token not in params.stop_ids and len(outputs[i]) < params.max_new_tokens:
                    still.append(i)
            active = still
            if active:
                logits = self.runner.forward([seqs[i] for i in active], last_only=True)
                stats.target_steps += 1
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = sum(map(len, outputs))
        for s in seqs:
            self.pool.register_full_blocks(s)
            self.pool.free_sequence(s)
        return outputs, stats

    def speculative(self, draft: Engine | PromptLookupDraft, prompt: list[int], params: SamplingParams, k: int = 4,
                    adaptive: bool = False, tree_width: int = 1) -> tuple[list[int], GenerationStats]:
        """One sequence with a draft (a model engine or prompt lookup); rejected tokens roll back in both caches.
        `tree_width` > 1 (greedy, an EAGLE head): a draft tree, the head's chain of k and its width - 1 next
        likeliest tokens beside each, verified in one pass under a tree mask."""
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stats = GenerationStats(prompt_tokens=len(prompt))
        drafter = ModelDraft(draft) if isinstance(draft, Engine) else draft
        tree = tree_width > 1 and params.temperature <= 0
        if tree:
            from runtime.eagle import EagleDraft
            from runtime.eagle_rows import propose_tree
            if not isinstance(drafter, EagleDraft):
                raise ValueError("tree drafting needs an EAGLE head as the draft")
        (t_seq,) = self._start([prompt])
        start = time.perf_counter()
        p_first = probabilities(self.runner.forward([t_seq])[0][-1], params)
        drafter.begin(prompt, params)
        stats.prefill_s = time.perf_counter() - start
        out: list[int] = []
        start = time.perf_counter()
        while len(out) < params.max_new_tokens:
            base = len(t_seq.tokens)  # accepted so far, the last (uncached) correction token included
            parents = None
            if tree and drafter.can_propose():
                proposals, parents = propose_tree(drafter, k, tree_width)
                qs, drafted = [None] * len(proposals), k  # acceptance counts the chain's depth
            else:
                proposals, qs = drafter.propose(k, params, gen)
                drafted = len(proposals)
            t_seq.tokens.extend(proposals)
            first = t_seq.cached  # the pass's first row: the correction token, or the first proposal
            if parents is not None:
                root = p_first is None  # the correction token is the tree's root row
                span = [-1] * root + [p + root if p >= 0 else root - 1 for p in parents]
                rows = self.runner.forward_tree(t_seq, span)
            else:
                rows = self.runner.forward([t_seq], last_only=False)[0] if proposals or p_first is None else None
            if params.temperature <= 0:  # p and q one-hot: the longest prefix the target's argmaxes agree with
                best = ([int(p_first.argmax())] if p_first is not None else []) + (
                    rows.argmax(-1).tolist() if rows is not None else [])
                if parents is not None:
                    branch, final = accept_tree(proposals, parents, best)
                    stats.leaves_accepted += bool(branch) and branch[-1] >= k
                    proposals, branch_rows = self._keep_branch(t_seq, base, proposals, branch, first)
                    drafter.proposed = proposals
                    accepted = len(branch)
                else:
                    accepted, final = accept_greedy(proposals, best)
            else:
                scored = [probabilities(row, params) for row in rows] if rows is not None else []
                ps = ([p_first] + scored) if p_first is not None else scored  # len(proposals) + 1 distributions
                accepted, final = accept_draft(ps, qs, proposals, gen)
            p_first = None
            new = proposals[:accepted] + [final]
            stats.target_steps += rows is not None  # a first token drawn from the prefill's distribution costs no pass
            stats.proposed += drafted
            stats.accepted += accepted
            stats.per_step_accepted.append(accepted)
            self.pool.truncate(t_seq, base + accepted)
            t_seq.tokens.append(final)
            if parents is not None:  # the branch's features, in the order `_keep_branch` left its tokens
                drafter.accept(base + accepted, final, branch_rows, first)
            else:
                drafter.accept(base + accepted, final)
            out.extend(new)
            if any(t in params.stop_ids for t in new):
                out = out[: next(i for i, t in enumerate(out) if t in params.stop_ids) + 1]
                break
            if adaptive:
                k = min(8, k + 1) if accepted == k else max(1, k - 1) if accepted == 0 else k
        out = out[: params.max_new_tokens]
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = len(out)
        self.pool.free_sequence(t_seq)
        drafter.finish()
        return out, stats

    def _keep_branch(self, seq: Sequence, base: int, nodes: list[int], branch: list[int], first: int
                     ) -> tuple[list[int], torch.Tensor]:
        """The accepted branch of a tree pass into place: its nodes' K/V and tokens to the positions after
        `base` (a chain prefix is there already; a leaf comes from further on). The branch's tokens, and the
        pass's features in that order (positions `first`.., for the drafter)."""
        for i, node in enumerate(branch):
            if node != i:
                self.pool.move(seq, base + node, base + i)
                seq.tokens[base + i] = nodes[node]
        rows = self.runner.features[0]
        return [nodes[node] for node in branch], rows[[*range(base - first), *(base - first + n for n in branch)]]

    def early_exit(self, exit_engine: Engine, prompt: list[int], params: SamplingParams, threshold: float
                   ) -> tuple[list[int], GenerationStats]:
        """Lossy greedy decoding: a token whose exit-model probability is >= `threshold` is emitted without the
        target (CALM / LayerSkip's early exit, with a separate exit model: `compress.draft --method early-exit`).

        The target catches up on the exited tokens at its next pass (their rows run with the next token's, so
        its cache holds them as plain decoding would); threshold > 1 never exits, i.e. plain greedy decoding.
        """
        if params.temperature > 0:
            raise ValueError("early exit is greedy (temperature 0)")
        stats = GenerationStats(prompt_tokens=len(prompt))
        (t_seq,) = self._start([prompt])
        (e_seq,) = exit_engine._start([prompt])
        start = time.perf_counter()
        first = int(self.runner.forward([t_seq], last_only=True)[0][-1].argmax())
        exit_engine.runner.forward([e_seq], last_only=True)
        stats.prefill_s = time.perf_counter() - start
        out = [first]
        start = time.perf_counter()
        while out[-1] not in params.stop_ids and len(out) < params.max_new_tokens:
            t_seq.tokens.append(out[-1])
            e_seq.tokens.append(out[-1])
            confidence, token = torch.softmax(exit_engine.runner.forward([e_seq], last_only=True)[0][-1].float(),
                                              -1).max(-1)
            if confidence.item() >= threshold:
                stats.exited += 1
                out.append(int(token))
            else:  # the target's pass: the exited tokens since its last pass, then this one
                out.append(int(self.runner.forward([t_seq], last_only=True)[0][-1].argmax()))
                stats.target_steps += 1
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = len(out)
        self.pool.free_sequence(t_seq)
        exit_engine.pool.free_sequence(e_seq)
        return out, stats


class ModelDraft:
    """A draft model on its own engine: proposes by sampling its own distribution k times."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        (self.seq,) = self.engine._start([prompt])
        self.probs = probabilities(self.engine.runner.forward([self.seq])[0][-1], params)

    def propose(self, k: int, params: SamplingParams, gen: torch.Generator | None
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        if self.probs is None:  # after `accept`: the draft has not seen the target's token yet
            self.probs = probabilities(self.engine.runner.forward([self.seq])[0][-1], params)
        tokens, qs = [], []
        for _ in range(k):
            token = draw(self.probs, gen)
            tokens.append(token)
            qs.append(self.probs)
            self.seq.tokens.append(token)
            self.probs = probabilities(self.engine.runner.forward([self.seq])[0][-1], params)
        return tokens, qs

    def note_proposals(self, tokens: list[int]) -> None:
        """Another drafter proposed `tokens` this cycle: `accept` keeps those the target accepted."""
        self.seq.tokens.extend(tokens)

    def accept(self, keep: int, final: int) -> None:
        """Keep the first `keep` tokens (prompt included), then the target's `final` token."""
        self.engine.pool.truncate(self.seq, keep)
        self.seq.tokens.append(final)
        self.probs = None  # computed when the next proposal needs it (never after the last step)

    def finish(self) -> None:
        self.engine.pool.free_sequence(self.seq)


class PromptLookupDraft:
    """Draft without a model: the tokens that followed the latest earlier occurrence of the context's last n-gram.

    Prompt lookup decoding (Saxena 2023; HF `prompt_lookup_num_tokens`, vLLM's "ngram" draft): answers
    that copy from the prompt (summaries, extraction, code edits) are proposed for free. The draft is
    deterministic, so its q is one-hot and the rejection rule stays exact: accept with probability
    p(token), else resample from p with that token removed.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.context = list(prompt)

    def propose(self, k: int, params: SamplingParams, gen: torch.Generator | None
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        tokens = lookup_continuation(self.context, k, self.max_ngram, self.min_ngram)
        return tokens, [None] * len(tokens)

    def accept(self, keep: int, final: int) -> None:
        self.context = self.context[:keep] + [final]

    def finish(self) -> None:
        self.context = []


class LookupFirstDraft:
    """Prompt lookup where the context's end recurs earlier, a model draft (or EAGLE head) everywhere else.

    Lookup proposals cost nothing and are right whenever the answer copies (names, figures, phrases of the
    prompt); the model covers the rest. Both stay in step with what the target accepts, so sampling stays
    exact (lookup's q is one-hot, the model's its own distribution). `lookup_k`: tokens per lookup proposal
    (default: the cycle's k)."""

    def __init__(self, lookup: PromptLookupDraft, model: ModelDraft | Any, lookup_k: int | None = None):
        self.lookup, self.model, self.lookup_k = lookup, model, lookup_k
        self.from_lookup: list[int] = []
        self.cycles = {"lookup": 0, "model": 0}

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.lookup.begin(prompt, params)
        self.model.begin(prompt, params)

    def propose(self, k: int, params: SamplingParams, gen: torch.Generator | None
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        tokens, qs = self.lookup.propose(self.lookup_k or k, params, gen)
        self.from_lookup = tokens
        self.cycles["lookup" if tokens else "model"] += 1
        return (tokens, qs) if tokens else self.model.propose(k, params, gen)

    def accept(self, keep: int, final: int) -> None:
        self.lookup.accept(keep, final)
        if self.from_lookup:
            self.model.note_proposals(self.from_lookup)
        self.model.accept(keep, final)

    def finish(self) -> None:
        self.lookup.finish()
        self.model.finish()


def lookup_continuation(context: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens following the most recent earlier match of the longest suffix n-gram (none: [])."""
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):  # the latest match that has a continuation
            if context[start:start + n] == suffix:
                return context[start + n:start + n + k]
    return []
