"""Greedy speculative decoding over two static decoders: each draft-and-verify cycle is one CUDA graph.

The engine's speculative loop (runtime/engine.py) is the general one (sampling, paged cache) and
goes through the host for every draft token; on a GPU, where the target's fused decode step
takes ~0.5 ms, that overhead would eat the gain. Here a cycle is k + 1 draft decode steps (the
last one only writes the k-th proposal's k/v), one target pass over the last accepted token and
the k proposals (`StaticDecoder.verify_step`: k + 1 positions for about the price of one step, the
weights are read once), and the acceptance: the longest prefix of proposals equal to the target's
argmax, plus the target's next token after it. All of it stays on the device; cycles are replayed
in chunks that cannot overshoot the token budget, so the host synchronises a few times per
answer. Rejected tokens roll back by moving both cache columns back: their stale k/v lie beyond
every later query's causal limit until overwritten. Greedy output equals the target's own greedy
output (up to floating-point ties between the one-token and the (k + 1)-token kernels).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from runtime.static_decode import StaticDecoder, capture_graph


@dataclass
class SpeculativeStats:
    new_tokens: int = 0
    cycles: int = 0  # target passes
    accepted: int = 0  # draft tokens accepted, over all cycles run
    k: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    proposed: int | None = None  # draft tokens proposed (None: k per cycle)

    @property
    def acceptance_rate(self) -> float:
        proposed = self.cycles * self.k if self.proposed is None else self.proposed
        return self.accepted / proposed if proposed else 0.0

    @property
    def tokens_per_target_step(self) -> float:
        return (self.accepted + self.cycles) / self.cycles if self.cycles else 0.0


class StaticSpeculator:
    def __init__(self, target: StaticDecoder, draft: StaticDecoder | None, k: int = 4):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if draft is not None and (target.embed.shape[0] != draft.embed.shape[0] or target.device != draft.device):
            raise ValueError("draft and target need the same vocabulary and device")
        self.target, self.draft, self.k = target, draft, k
        device = target.device
        self.tokens = torch.zeros(k + 2, 1, dtype=torch.long, device=device)  # last accepted, k proposals, spare
        self.offsets = torch.arange(k + 1, device=device)
        self.out = torch.zeros(target.max_len + k + 1, dtype=torch.long, device=device)
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens in `out`
        self.accepted = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stats = SpeculativeStats(k=k)
        # cycles between looks at the output when a stop token may end it: each look costs a round trip
        # (the GPU idles while the host reads and relaunches), each cycle run past the stop is wasted
        self.stop_chunk = 2

    def cycle(self) -> None:
        """Draft k tokens, verify them, append the accepted ones and the target's next token to `out`."""
        target, draft, k = self.target, self.draft, self.k
        for i in range(k + 1):
            draft.step_fn(1, self.tokens[i:i + 1], self.tokens[i + 1:i + 2])
        self._accept(target.verify_step(self.tokens[:k + 1]))  # the target's token after each of the k + 1
        draft.pos[:1].copy_(target.pos[:1])
        draft.col.copy_(target.col)

    def _accept(self, argmax: torch.Tensor) -> torch.Tensor:
        """The longest prefix of proposals equal to the target's argmax, and its token after them, appended to
        `out`; the target's position and cache column moved past them. Returns the accepted count (a tensor)."""
        k, target = self.k, self.target
        accepted = (argmax[:k] == self.tokens[1:k + 1, 0]).long().cumprod(0).sum()
        self.out.index_copy_(0, self.count + self.offsets, argmax)  # argmax[:accepted + 1] are the new tokens
        self.tokens[0].copy_(argmax.gather(0, accepted.view(1)))
        advance = accepted + 1
        target.pos[:1] += advance
        target.col += advance
        self.count += advance
        self.accepted += accepted
        return accepted

    def _prefill_draft(self, prompt: list[int], new_tokens: int) -> None:
        self.draft.prefill([prompt], new_tokens)  # its own first token is not used: the target's is

    def _state(self) -> list[torch.Tensor]:
        drafts = [] if self.draft is None else self.draft.state(1)
        return [self.tokens, self.out, self.count, self.accepted, *self.target.state(1), *drafts]

    @torch.inference_mode()
    def generate(self, prompt: list[int], new_tokens: int, stop_ids: tuple[int, ...] = (),
                 use_graph: bool | None = None) -> list[int]:
        """Greedy continuation of one prompt: `new_tokens` ids, or up to and including the first stop id."""
        target, k = self.target, self.k
        limit = target.max_len if self.draft is None else min(target.max_len, self.draft.max_len)
        if len(prompt) + new_tokens + k > limit:
            raise ValueError(f"prompt {len(prompt)} + {new_tokens} new tokens + k {k} exceed the static cache "
                             f"({limit})")
        use_graph = target.device.type == "cuda" if use_graph is None else use_graph
        started = time.perf_counter()
        target.prefill([prompt], new_tokens)
        self._prefill_draft(prompt, new_tokens)
        self.tokens[0].copy_(target.tokens[0])
        self.out[0] = target.tokens[0, 0]
        self.count.fill_(1)
        self.accepted.zero_()
        if use_graph and self.graph is None:
            self.graph = capture_graph(self.cycle, self._state())
        target._sync()
        prefilled = time.perf_counter()
        cycles, done, out = 0, 1, [int(target.tokens[0, 0])]
        while done < new_tokens and not any(t in stop_ids for t in out):
            # each cycle adds 1..k+1 tokens: this many cannot overshoot the budget (few near a stop token)
            chunk = math.ceil((new_tokens - done) / (k + 1))
            chunk = min(chunk, self.stop_chunk) if stop_ids else chunk
            for _ in range(chunk):
                self.graph.replay() if use_graph else self.cycle()
            cycles += chunk
            done = int(self.count.item())
            out += self.out[len(out):done].tolist()  # only what this chunk added
        out = out[:new_tokens]
        cut = next((i + 1 for i, t in enumerate(out) if t in stop_ids), len(out))
        self.stats = SpeculativeStats(new_tokens=cut, cycles=cycles, accepted=int(self.accepted.item()), k=k,
                                      prefill_s=prefilled - started, decode_s=time.perf_counter() - prefilled)
        return out[:cut]


class StaticEagleSpeculator(StaticSpeculator):
    """The same cycle with an EAGLE head (runtime/eagle.py) as the draft, on a `StaticDecoder` of the head.

    A cycle: the head first catches up on the previous verify pass's k + 1 rows (the target's
    features there and its argmax after each: for the accepted rows exactly the head's next inputs;
    the rows past them are overwritten later, as the target's), takes its first proposal from the
    row of the last accepted token, drafts k - 1 more one row at a time, then the target verifies
    and hands back the features of all k + 1 rows. Every shape is fixed, so the cycle is one graph.
    """

    def __init__(self, target: StaticDecoder, head, k: int = 4):
        head_decoder = StaticDecoder(head, max_batch=1, max_len=target.max_len + k + 1, dtype=target.dtype)
        super().__init__(target, head_decoder, k)  # checks k, the vocabulary and the device
        if target.step_fn == target.fused_step and not head_decoder.unfusable:
            head_decoder.use_fused_kernels()
        device, hidden = target.device, target.embed.shape[1]
        self.fc = head.fc.weight.detach().to(device=device, dtype=target.dtype)
        self.vocab_ids = None if head.vocab_ids is None else head.vocab_ids.to(device)
        self.features = torch.zeros(k + 1, hidden, dtype=target.dtype, device=device)  # the last verify's rows
        self.targets = torch.zeros(k + 1, dtype=torch.long, device=device)  # the target's argmax after each
        self.last = torch.zeros(1, dtype=torch.long, device=device)  # proposals the last verify accepted

    def _prefill_draft(self, prompt: list[int], new_tokens: int) -> None:
        from runtime.eagle import draft_rows

        target, head = self.target, self.draft
        features = target.prompt_features[0]  # (len(prompt), hidden)
        head.valid.zero_()
        head.pos.zero_()
        head.col.zero_()
        if len(prompt) > 1:  # entries 0..n-2: the feature of position i and prompt token i + 1
            ids = torch.tensor(prompt[1:], device=target.device)
            draft_rows(head, self.fc, self.vocab_ids, features[:-1], ids, eager=True)
        # the first cycle's catch-up: entry n - 1 reads the last prompt feature and the target's first token
        self.features.zero_()
        self.features[0].copy_(features[-1])
        self.targets.zero_()
        self.targets[0] = target.tokens[0, 0]
        self.last.zero_()
        head.pos.fill_(len(prompt) - 1)
        head.col.fill_(len(prompt) - 1)

    def cycle(self) -> None:
        from runtime.eagle import draft_rows

        target, head, k = self.target, self.draft, self.k
        predicted, proposals = draft_rows(head, self.fc, self.vocab_ids, self.features, self.targets)
        feature = predicted.index_select(0, self.last)  # the row of the last accepted token
        self.tokens[1].copy_(proposals.index_select(0, self.last))
        head.pos[:1] += self.last + 1
        head.col += self.last + 1
        for i in range(1, k):
            feature, token = draft_rows(head, self.fc, self.vocab_ids, feature, self.tokens[i])
            self.tokens[i + 1].copy_(token)
            head.pos[:1] += 1
            head.col += 1
        argmax = target.verify_step(self.tokens[:k + 1], features=self.features)
        head.pos[:1].copy_(target.pos[:1])  # the next catch-up starts at this verify pass's first position
        head.col.copy_(target.col)
        self.targets.copy_(argmax)
        self.last.copy_(self._accept(argmax).view(1))

    def _state(self) -> list[torch.Tensor]:
        return [*super()._state(), self.features, self.targets, self.last]


class StaticExitSpeculator(StaticSpeculator):
    """The KV-sharing early exit (runtime/exit_head.py) on the static decoder, one graph per cycle.

    The draft is the target's own first L layers and the exit: drafting a token writes those layers'
    K/V into the target's cache where plain decoding would, so the verify pass runs only layers L.. over
    the k + 1 rows (the last accepted token and the k proposals), from the layer-L states the draft left
    (the k-th proposal's first layers run too, without an exit). Rejected rows lie past every later
    query's causal limit until overwritten, as in the base cycle. `vocab_ids`: the exit proposes only
    these tokens (the LM head's rows for them).
    """

    def __init__(self, target: StaticDecoder, head, k: int = 4, vocab_ids: torch.Tensor | None = None):
        super().__init__(target, None, k)
        if not 0 < head.exit_layer < len(target.layers):
            raise ValueError(f"the exit layer {head.exit_layer} is not inside the target's {len(target.layers)}")
        device, dtype = target.device, target.dtype
        self.shallow, self.deep = slice(0, head.exit_layer), slice(head.exit_layer, None)
        self.exit = copy.deepcopy(head).to(device=device, dtype=dtype).eval().requires_grad_(False)  # decoder dtype
        self.exit_eps = head.norm.eps or target.eps
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(device)
        self.exit_lm_head = target.lm_head if vocab_ids is None else target.lm_head[self.vocab_ids]
        self.states = torch.zeros(k + 1, target.embed.shape[1], dtype=dtype, device=device)  # layer-L outputs

    def _prefill_draft(self, prompt: list[int], new_tokens: int) -> None:
        pass  # the prefill filled every layer's cache: the draft's layers are the target's

    def _exit_token(self, state: torch.Tensor) -> torch.Tensor:
        """A layer-L state (1, hidden) -> the exit's greedy token (1,): the adapter, the final norm, the LM head."""
        target = self.target
        if target.step_fn == target.fused_step:  # the adapter's two linears with the fused kernels' epilogues
            from runtime.triton_decode import fused_linear

            exit_ = self.exit
            gated = fused_linear(state, exit_.gate_up.weight, norm=exit_.norm.weight, eps=self.exit_eps, swiglu=True)
            hidden = fused_linear(gated, exit_.down.weight, residual=state)
        else:
            hidden = self.exit(state)
        best = target.greedy(hidden, lm_head=self.exit_lm_head)
        return best if self.vocab_ids is None else self.vocab_ids[best]

    def cycle(self) -> None:
        target, k = self.target, self.k
        for i in range(k + 1):  # each row at its own position: pos/col walk forward, then back for the verify
            self.states[i:i + 1].copy_(target.run_rows(target.embed_tokens(self.tokens[i]), layers=self.shallow))
            if i < k:
                self.tokens[i + 1].copy_(self._exit_token(self.states[i:i + 1]))
            target.pos[:1] += 1
            target.col += 1
        target.pos[:1] -= k + 1
        target.col -= k + 1
        self._accept(target.greedy(target.run_rows(self.states, layers=self.deep)))

    def _state(self) -> list[torch.Tensor]:
        return [*super()._state(), self.states]


class StaticLookupSpeculator:
    """Prompt lookup (runtime/engine.py `lookup_continuation`) as the draft of the static decoder: greedy.

    The proposals come from the host (an n-gram match in the tokens so far), so each cycle reads its
    result back: one graph per proposal count n (the target verifies n + 1 rows, the accepted prefix
    and the target's next token are kept), or the plain decode step's graph when nothing matches.
    """

    def __init__(self, target: StaticDecoder, k: int = 2, max_ngram: int = 3, min_ngram: int = 1):
        if k < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs k >= 1 and 1 <= min_ngram <= max_ngram, got {k}, {min_ngram}, "
                             f"{max_ngram}")
        self.target, self.k, self.max_ngram, self.min_ngram = target, k, max_ngram, min_ngram
        device = target.device
        self.tokens = torch.zeros(k + 1, 1, dtype=torch.long, device=device)  # the last token, then proposals
        self.result = torch.zeros(k + 1, dtype=torch.long, device=device)  # the target's argmax after each row
        self.accepted = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.stats = SpeculativeStats(k=k)

    def _verify(self, n: int) -> None:
        target = self.target
        argmax = target.verify_step(self.tokens[:n + 1])
        accepted = (argmax[:n] == self.tokens[1:n + 1, 0]).long().cumprod(0).sum()
        self.result[:n + 1].copy_(argmax)
        self.accepted.copy_(accepted.view(1))
        self.tokens[0].copy_(argmax.gather(0, accepted.view(1)))
        target.pos[:1] += accepted + 1
        target.col += accepted + 1

    def _step(self) -> None:
        self.target.step_fn(1, self.tokens[:1], self.tokens[:1])

    def _run(self, n: int, use_graph: bool) -> None:
        if not use_graph:
            self._verify(n) if n else self._step()
            return
        if n not in self.graphs:
            state = [self.tokens, self.result, self.accepted, *self.target.state(1)]
            self.graphs[n] = capture_graph((lambda: self._verify(n)) if n else self._step, state)
        self.graphs[n].replay()

    @torch.inference_mode()
    def generate(self, prompt: list[int], new_tokens: int, stop_ids: tuple[int, ...] = (),
                 use_graph: bool | None = None) -> list[int]:
        """Greedy continuation of one prompt: `new_tokens` ids, or up to and including the first stop id."""
        from runtime.engine import lookup_continuation

        target, k = self.target, self.k
        if len(prompt) + new_tokens + k > target.max_len:
            raise ValueError(f"prompt {len(prompt)} + {new_tokens} new tokens + k {k} exceed the static cache "
                             f"({target.max_len})")
        use_graph = target.device.type == "cuda" if use_graph is None else use_graph
        started = time.perf_counter()
        target.prefill([prompt], new_tokens)
        self.tokens[0].copy_(target.tokens[0])
        out = [int(target.tokens[0, 0])]
        prefilled = time.perf_counter()
        context, cycles, accepted, proposed = list(prompt) + out, 0, 0, 0
        while len(out) < new_tokens and out[-1] not in stop_ids:
            proposals = lookup_continuation(context, min(k, new_tokens - len(out)), self.max_ngram, self.min_ngram)
            if proposals:
                self.tokens[1:len(proposals) + 1, 0].copy_(torch.tensor(proposals))
            self._run(len(proposals), use_graph)
            if proposals:
                count = int(self.accepted.item())
                new = self.result[:count + 1].tolist()
                accepted, proposed = accepted + count, proposed + len(proposals)
            else:
                new = [int(self.tokens[0, 0])]
            cycles += 1
            cut = next((i + 1 for i, t in enumerate(new) if t in stop_ids), len(new))
            out += new[:cut]
            context += new
        out = out[:new_tokens]
        self.stats = SpeculativeStats(new_tokens=len(out), cycles=cycles, accepted=accepted, k=k,
                                      prefill_s=prefilled - started, decode_s=time.perf_counter() - prefilled,
                                      proposed=proposed)
        return out
