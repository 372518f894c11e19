"""Continuous batching over the paged engine.

Each step runs one forward over a mixed batch: one new token for every decoding sequence plus
chunks of waiting prompts (so a long prompt never stalls running decodes for more than one
chunk). Requests are admitted by priority while the KV pool can hold their worst case (prompt +
max_tokens), so a running sequence never runs out of blocks; `n > 1` samples are admitted after
the first sample's prefill and share its prompt blocks through the prefix cache. Cancelled
requests release their blocks at the next step boundary. Deterministic (greedy) results are
memoised when a response cache is configured: the caller gives each request its cache key (None:
not cacheable), which must hold everything that determines the output.

Per token the scheduler can report log-probabilities (the chosen token's and the top N), and per
prompt position when asked (OpenAI's `echo` + `logprobs`): such a prompt is computed in full,
never taken from the prefix cache.

With a draft engine, every decoding sequence advances speculatively inside the same batched
step: the draft proposes up to k tokens for all of them, the target scores each sequence's k + 1
positions in the one forward, and the exact rejection rule decides per sequence (greedy output
equals the target's; sampled output has the target's distribution); rejected tokens are rolled
back in both caches. An EAGLE head (runtime/eagle.py) drafts instead from each sequence's features of
the batched pass, one head cache per sequence. An exit head (runtime/exit_head.py) drafts each greedy
sequence with the target's own first layers, and its verify pass runs only the layers after the exit
(per sequence, beside the batched pass of the others).

The next tokens of all other rows (greedy or sampled, any temperature / top-k / top-p / seed)
come from one `runtime.sampling.sample_rows` call on the logits' device: one host synchronisation
per step, and a seeded request draws the same tokens whatever shares its batch.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from runtime.engine import Engine, adjust_logits, token_logprobs
from runtime.kv_cache import Sequence
from runtime.requests import QueueFull, Request, SchedulerStats, check_request, worst_case_blocks
from runtime.sampling import sample_rows
from runtime.scheduler_drafts import DraftSteps


@dataclass
class _Sample:
    request: Request
    index: int
    seq: Sequence
    generator: torch.Generator | None  # the speculative path's draws
    prompt_len: int
    seed: int  # the batch sampler's key (with the count of generated tokens)
    draft_seq: Sequence | None = None
    eagle: Any = None  # its EagleDraft, with an EAGLE head as the draft
    exit_states: Any = None  # with an exit head: the layer-L states of this step's rows, where it drafted

    @property
    def prefilling(self) -> bool:
        return self.seq.cached < self.prompt_len


class Scheduler(DraftSteps):
    def __init__(self, engine: Engine, max_context: int, max_running: int = 16, max_queue: int = 64,
                 max_batch_tokens: int = 256, response_cache_size: int = 0, draft: Any = None,
                 k: int = 4, decode_steps: int = 1, draft_max_batch: int | None = None):
        """decode_steps: when every sequence past its prompt is plainly greedy, run up to this many decode steps
        of them on the device before coming back to the host (`PagedDecoder.decode_greedy`), alternating with
        a step of prompt chunks while prompts wait: a new request waits at most one burst to start its
        prefill, and tokens stream in bursts.
        draft_max_batch: the draft proposes only while at most this many sequences decode (None: always)."""
        from runtime.eagle import EagleHead
        from runtime.exit_head import ExitHead

        self.pool, self.runner = engine.pool, engine.runner
        self.eagle_head = draft if isinstance(draft, EagleHead) else None  # drafts on the target's features
        self.exit_head = draft if isinstance(draft, ExitHead) else None  # drafts with the target's first layers
        if self.eagle_head is not None:
            draft = None
            self.runner.keep_features = True
        elif self.exit_head is not None:
            draft = None
        elif draft is not None and (draft.pool.num_blocks, draft.pool.block_size) != (self.pool.num_blocks,
                                                                                       self.pool.block_size):
            raise ValueError("the draft's KV pool must have the target's block size and block count")
        self.draft = draft
        self.k = k if draft is not None or self.eagle_head is not None or self.exit_head is not None else 0
        self.max_context, self.max_running, self.max_queue = max_context, max_running, max_queue
        self.max_batch_tokens = max_batch_tokens
        self.decode_steps = decode_steps
        self.draft_max_batch = draft_max_batch
        if self.eagle_head is not None:  # a dense K/V slot per running sequence; CUDA graphs of its passes
            from runtime.eagle_rows import HeadCache

            # positions grow by doubling as sequences get longer (graphs re-captured then)
            self.head_cache = HeadCache(self.eagle_head, max_running, min(max_context + k + 1, 1024),
                                        graph_width=k + 1)
        self.batched_drafting = True  # greedy EAGLE proposals for all sequences in one head pass per token
        self.prefix_features: OrderedDict[int, torch.Tensor] = OrderedDict()  # an EAGLE head's, by block hash
        self.waiting: list[tuple[int, float, int, Request]] = []
        self.running: list[_Sample] = []
        self.pending_siblings: list[tuple[_Sample, Request, int]] = []
        self.reserved_blocks = 0
        self.stats = SchedulerStats()
        self.response_cache: OrderedDict[tuple, list[tuple[list[int], str]]] = OrderedDict()
        self.response_cache_size = response_cache_size
        self._order = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._burst_last = False

    # ---- called from any thread -------------------------------------------------------------
    def submit(self, request: Request) -> None:
        check_request(request, self.max_context, self._worst_case_blocks(request), self.pool.num_blocks)
        request.start()
        with self._lock:
            cached = self._cached_response(request)
            if cached is None and len(self.waiting) >= self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} waiting)")
            if cached is None:
                heapq.heappush(self.waiting, (request.priority, request.arrival, next(self._order), request))
                self._lock.notify()
        if cached is not None:  # replayed outside the lock: the callbacks may block briefly
            samples, request.prompt_scores = cached
            for i, (records, reason) in enumerate(samples):
                for token, logprob, top in records:
                    request.emit(i, token, logprob, top)
                request.finish(i, reason)

    def _cached_response(self, request: Request) -> tuple | None:
        """The stored answer for this request's key (caller holds the lock)."""
        if not self.response_cache_size or request.cache_key is None:
            return None
        cached = self.response_cache.get(request.cache_key)
        if cached is not None:
            self.stats.response_cache_hits += 1
            self.response_cache.move_to_end(request.cache_key)
        return cached

    def cancel(self, request: Request) -> None:
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ---- the scheduler thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting and not self.running and not self.pending_siblings:
                    self._lock.wait(0.5)
                if self._stop:
                    return
            self.step()

    @property
    def slack(self) -> int:
        """Positions a sequence may hold past prompt + max_tokens: draft proposals, or a burst's steps."""
        return self.k + max(self.decode_steps - 1, 0)

    def _worst_case_blocks(self, request: Request) -> int:
        return worst_case_blocks(request, self.slack, self.pool.block_size)

    def _generator(self, request: Request, index: int) -> torch.Generator | None:
        seed = request.params.seed
        return torch.Generator().manual_seed((seed + index) % 2**63) if seed is not None else None

    def _new_sample(self, request: Request, index: int) -> _Sample:
        seq = Sequence(list(request.prompt))
        self.pool.admit(seq, reuse_prefix=not (request.prompt_logprobs and index == 0))
        seed = request.params.seed
        sample = _Sample(request, index, seq, self._generator(request, index), len(request.prompt),
                         (seed + index) % 2**63 if seed is not None else secrets.randbits(63))
        if self.draft is not None:
            sample.draft_seq = Sequence(list(request.prompt))
            self.draft.pool.admit(sample.draft_seq)
        if self.eagle_head is not None:
            from runtime.eagle import EagleDraft

            sample.eagle = EagleDraft(self.eagle_head, self.runner, self.head_cache)
            hidden = self.runner.model.config.hidden_size
            sample.eagle.begin(request.prompt, rows=torch.empty(0, hidden, device=self.runner.device,
                                                                 dtype=next(self.eagle_head.parameters()).dtype))
            self._give_prefix_features(sample)
        return sample

    def _caches(self, sample: _Sample) -> list[tuple[Any, Sequence]]:
        """The (pool, sequence) pairs a sample holds: the target's, and the draft model's if there is one."""
        return [(self.pool, sample.seq)] + ([(self.draft.pool, sample.draft_seq)] if self.draft else [])

    def _free(self, sample: _Sample, register: bool = False) -> None:
        if sample.eagle is not None:
            if register:
                self._keep_prefix_features(sample)
            sample.eagle.release()
        for pool, seq in self._caches(sample):
            if register:
                pool.register_full_blocks(seq)
            pool.free_sequence(seq)

    def _admit(self) -> None:
        with self._lock:
            if any(w[3].cancelled for w in self.waiting):
                self.stats.cancelled_requests += sum(w[3].cancelled for w in self.waiting)
                self.waiting = [w for w in self.waiting if not w[3].cancelled]
                heapq.heapify(self.waiting)
            while self.waiting:
                request = self.waiting[0][3]
                need = self._worst_case_blocks(request)
                if (len(self.running) + request.n > self.max_running and self.running) or \
                        self.reserved_blocks + need > self.pool.num_blocks:
                    break
                heapq.heappop(self.waiting)
                request.reserved_blocks = need
                self.reserved_blocks += need
                self.running.append(self._new_sample(request, 0))
                self.stats.prompt_tokens += len(request.prompt)
                for i in range(1, request.n):
                    self.pending_siblings.append((self.running[-1], request, i))

    def _drop_cancelled(self) -> None:
        keep = []
        for sample in self.running:
            if sample.request.cancelled:
                self._free(sample)
                if sample.request.reserved_blocks:
                    self.stats.cancelled_requests += 1
                    self._release(sample.request)
            else:
                keep.append(sample)
        self.running = keep
        for _, request, _ in self.pending_siblings:
            if request.cancelled and request.reserved_blocks:
                self.stats.cancelled_requests += 1
                self._release(request)
        self.pending_siblings = [p for p in self.pending_siblings if not p[1].cancelled]

    def _release(self, request: Request) -> None:
        self.reserved_blocks -= request.reserved_blocks
        request.reserved_blocks = 0

    @torch.inference_mode()
    def step(self) -> int:
        """One scheduling step; returns the number of tokens the target's forward pass ran."""
        self._drop_cancelled()
        for parent, request, index in list(self.pending_siblings):
            if not parent.prefilling or parent not in self.running:
                self.pending_siblings.remove((parent, request, index))
                self.running.append(self._new_sample(request, index))  # shares the parent's full blocks
        self._admit()
        if self.decode_steps > 1 and self.k == 0:
            # a burst, unless prompts wait and the last call was a burst: prompts that arrive during a burst
            # are prefilled together in the next step, and decoding rows never wait for more than one step
            prompts_wait = any(s.prefilling for s in self.running)
            ran = 0 if prompts_wait and self._burst_last else self._multi_step()
            self._burst_last = bool(ran)
            if ran:
                return ran
        decoding = [s for s in self.running if not s.prefilling]
        drafting = self.k and (self.draft_max_batch is None or len(decoding) <= self.draft_max_batch)
        proposals = {}
        if drafting:
            drafted_at = time.perf_counter()
            proposals = self._propose(decoding)
            self.stats.draft_calls += 1
            self.stats.draft_seconds += time.perf_counter() - drafted_at
        batch = list(decoding)
        ends = [len(s.seq.tokens) for s in decoding]  # one new token each, plus any draft proposals
        budget = self.max_batch_tokens - sum(1 + len(proposals.get(id(s), ((), ()))[0]) for s in decoding)
        for sample in self.running:  # prompt chunks within the token budget
            if sample.prefilling and budget > 0:
                end = min(sample.prompt_len, sample.seq.cached + budget)
                batch.append(sample)
                ends.append(end)
                budget -= end - sample.seq.cached
        if not batch:
            return 0
        started = time.perf_counter()
        chunks = [(s, e) for s, e in zip(batch, ends, strict=True)
                  if s.prefilling and s.draft_seq is not None and s.draft_seq.cached < e]
        scored = [s.prefilling and s.request.prompt_logprobs and s.index == 0 for s in batch]
        starts = [s.seq.cached for s in batch]
        last_only = [id(s) not in proposals and not full for s, full in zip(batch, scored, strict=True)]
        logits = self._forward(batch, last_only, ends)
        features = self.runner.features if self.eagle_head is not None else [None] * len(batch)
        if chunks:  # the draft reads the same prompt chunks
            self.draft.runner.forward([s.draft_seq for s, _ in chunks], ends=[e for _, e in chunks])
        chosen = self._next_tokens(batch, ends, logits, proposals)
        argmaxes = self._greedy_targets(batch, logits, proposals)
        results_at = time.perf_counter()
        decoded = 0
        for sample, start, end, rows, full, feats in zip(batch, starts, ends, logits, scored, features, strict=True):
            request = sample.request
            if full:
                self._score_prompt(request, start, end, rows)
            if end < sample.prompt_len:
                if sample.eagle is not None:
                    sample.eagle.extend(feats, start, end)
                continue  # a chunk of a longer prompt: no token yet
            if end == sample.prompt_len and sample.index == 0:  # siblings and later requests reuse them
                self.pool.register_full_blocks(sample.seq)
                if sample.draft_seq is not None:
                    self.draft.pool.register_full_blocks(sample.draft_seq)
            if end == sample.prompt_len and request.params.max_new_tokens == 0:  # only the prompt's scores
                self._retire(sample, "length")
                continue
            if id(sample) in proposals:
                new = self._verify(sample, rows, *proposals[id(sample)], argmaxes.get(id(sample)))
                rows = rows[: len(new)]
            else:
                rows = rows[-1:]
                new = [chosen[id(sample)]]
                for seq in (sample.seq, sample.draft_seq):
                    if seq is not None:
                        seq.tokens.append(new[0])
            if sample.eagle is not None:  # the tokens that stand, then the target's new one
                sample.eagle.accept(len(sample.seq.tokens) - 1, new[-1], feats, start)
                if end == sample.prompt_len:  # the prompt's blocks were just registered (siblings come next)
                    self._keep_prefix_features(sample)
            records = (token_logprobs(rows, new, request.logprobs) if request.logprobs is not None
                       else [(None, None)] * len(new))
            for token, (logprob, top) in zip(new, records, strict=True):
                decoded += 1
                if self._deliver(sample, token, logprob, top):
                    break
        kind = "mixed" if len(batch) > len(decoding) else "speculative" if proposals else "decode"
        self._record_step(decoded, started, kind, results_at)
        return self.max_batch_tokens - budget

    def _record_step(self, decoded: int, started: float, kind: str, results_at: float) -> None:
        """Step counters per kind (mixed, decode, speculative, burst: calls, tokens, seconds, seconds after the
        device's results were back: the host's share) and the smoothed decode rate of a step that began at
        `started` (perf_counter)."""
        now = time.perf_counter()
        elapsed = now - started
        self.stats.steps += 1
        self.stats.generated_tokens += decoded
        kind_stats = self.stats.step_kinds.setdefault(kind, [0, 0, 0.0, 0.0])
        kind_stats[0] += 1
        kind_stats[1] += decoded
        kind_stats[2] += elapsed
        kind_stats[3] += now - results_at
        rate = decoded / elapsed if elapsed > 0 else 0.0
        self.stats.decode_tokens_per_s = 0.9 * self.stats.decode_tokens_per_s + 0.1 * rate

    def _multi_step(self) -> int:
        """Several greedy decode steps of the rows past their prompts in one device call, when every such row
        is plainly greedy (no sampling, penalties or logprobs). A row that ends inside the burst (stop token,
        max_tokens) retires there; its later tokens are dropped (their KV slots lie in the blocks reserved for
        it). Tokens run the target's forward (0: not taken)."""
        batch = [s for s in self.running if not s.prefilling]
        if not batch or any(s.request.params.temperature > 0 or s.request.params.adjusts_logits
                            or s.request.logprobs is not None for s in batch):
            return 0
        steps = min(self.decode_steps, *(self.max_context - len(s.seq.tokens) for s in batch))
        if steps < 2:
            return 0
        started = time.perf_counter()
        decoded = 0
        new_tokens = self.runner.decode_greedy([s.seq for s in batch], steps)
        results_at = time.perf_counter()
        for sample, tokens in zip(batch, new_tokens, strict=True):
            cached = sample.seq.cached
            for token in tokens:
                sample.seq.tokens.append(token)
                sample.seq.cached = min(cached, len(sample.seq.tokens) - 1)  # what stands if this token ends it
                decoded += 1
                if self._deliver(sample, token):
                    break
        self._record_step(decoded, started, "burst", results_at)
        return len(batch) * steps

    @staticmethod
    def _next_tokens(batch: list[_Sample], ends: list[int], logits: list[torch.Tensor], proposals: dict
                     ) -> dict[int, int]:
        """The next token of every row past its prompt without draft proposals, from one batched sampler call."""
        picked = [(sample, rows[-1]) for sample, end, rows in zip(batch, ends, logits, strict=True)
                  if end >= sample.prompt_len and id(sample) not in proposals]
        if not picked:
            return {}
        last = torch.stack([row for _, row in picked])
        adjusted = [i for i, (sample, _) in enumerate(picked) if sample.request.params.adjusts_logits]
        if adjusted:  # penalties and bias: per row, in float32
            last = last.float()
            for i in adjusted:
                sample = picked[i][0]
                last[i] = adjust_logits(last[i], sample.request.params, sample.request.outputs[sample.index])
        params = [s.request.params for s, _ in picked]
        tokens = sample_rows(last, [p.temperature for p in params], [p.top_k for p in params],
                             [p.top_p for p in params], [s.seed for s, _ in picked],
                             [len(s.request.outputs[s.index]) for s, _ in picked]).tolist()
        return {id(sample): token for (sample, _), token in zip(picked, tokens, strict=True)}

    def _score_prompt(self, request: Request, start: int, end: int, rows: torch.Tensor) -> None:
        """Logprobs of prompt tokens start+1 .. end-1 (and end, when inside the prompt) from this chunk's rows."""
        targets = request.prompt[start + 1:min(end + 1, len(request.prompt))]
        if request.prompt_scores is None:
            request.prompt_scores = []
        if targets:
            request.prompt_scores += token_logprobs(rows[: len(targets)], targets, request.logprobs or 0)

    def _deliver(self, sample: _Sample, token: int, logprob: float | None = None,
                 top: list[tuple[int, float]] | None = None) -> bool:
        """Emit one token; retire the sample (True) on a stop token, max_tokens or the context limit."""
        request = sample.request
        request.emit(sample.index, token, logprob, top)
        generated = len(request.outputs[sample.index])
        reason = "stop" if token in request.params.stop_ids else "length" if (
            generated >= request.params.max_new_tokens or len(sample.seq.tokens) >= self.max_context) else None
        if reason is not None:
            self._retire(sample, reason)
        return reason is not None

    def _retire(self, sample: _Sample, reason: str) -> None:
        request = sample.request
        self._free(sample, register=True)
        self.running.remove(sample)
        request.finish(sample.index, reason)
        if request.finished == request.n:
            self._release(request)
            self.stats.finished_requests += 1
            if self.response_cache_size and request.cache_key is not None and not request.cancelled:
                answer = ([(list(r), reason) for r, reason in zip(request.records, request.finish_reasons,
                                                                   strict=True)], request.prompt_scores)
                with self._lock:
                    self.response_cache[request.cache_key] = answer
                    while len(self.response_cache) > self.response_cache_size:
                        self.response_cache.popitem(last=False)
