"""What a client asks the scheduler for and what it gets back: requests, their events, the bounds that make
one unservable, and the scheduler's counters (shared by the in-process scheduler, the engine process and the
TensorRT-LLM backend)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.engine import SamplingParams


class QueueFull(RuntimeError):
    """The bounded wait queue is full (HTTP 429)."""


class EngineGone(RuntimeError):
    """The scheduler's process has exited (HTTP 503)."""


@dataclass
class Event:
    kind: str  # "token" | "done"
    index: int  # which of the request's n samples
    token: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None  # with Request.logprobs set: log p(token) under the model
    top_logprobs: list[tuple[int, float]] | None = None  # and the top-N (id, log p) pairs


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    n: int = 1
    priority: int = 0  # lower runs first
    on_event: Callable[[Event], None] = lambda event: None  # called on the scheduler thread
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: int = 0
    reserved_blocks: int = 0  # KV blocks set aside for this request while it runs
    first_token_at: float | None = None
    outputs: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    logprobs: int | None = None  # report per-token logprobs with this many top alternatives (None: off)
    prompt_logprobs: bool = False  # also score every prompt token after the first (`prompt_scores`)
    prompt_scores: list[tuple[float, list[tuple[int, float]]]] | None = None  # set before the first token
    cache_key: tuple | None = None  # response-cache key; None: never served from or stored in the cache
    records: list[list[tuple[int, float | None, list | None]]] = field(default_factory=list)

    def start(self) -> None:
        """Fresh per-sample outputs, before the request runs (or is replayed from the cache)."""
        self.outputs = [[] for _ in range(self.n)]
        self.finish_reasons = [None] * self.n
        self.records = [[] for _ in range(self.n)]

    def emit(self, index: int, token: int, logprob: float | None = None,
             top: list[tuple[int, float]] | None = None) -> None:
        """Record sample `index`'s next token and tell the caller (on the thread that produced it)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.outputs[index].append(token)
        self.records[index].append((token, logprob, top))
        self.on_event(Event("token", index, token=token, logprob=logprob, top_logprobs=top))

    def finish(self, index: int, reason: str) -> None:
        self.finish_reasons[index] = reason
        self.finished += 1
        self.on_event(Event("done", index, finish_reason=reason))


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    cancelled_requests: int = 0
    response_cache_hits: int = 0
    steps: int = 0
    decode_tokens_per_s: float = 0.0
    draft_proposed: int = 0
    draft_accepted: int = 0
    speculative_steps: int = 0  # target passes of decoding sequences that had a draft
    speculative_tokens: int = 0  # tokens those passes produced
    draft_calls: int = 0  # drafting before a step (every sequence's proposals)
    draft_seconds: float = 0.0  # their wall time (not in step_kinds: no token is generated there)
    prefix_feature_blocks: int = 0  # prefix-cache blocks whose EAGLE features came kept, not recomputed
    step_kinds: dict[str, list[float]] = field(default_factory=dict)  # kind -> [calls, tokens, s, host s]

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def tokens_per_target_step(self) -> float:
        return self.speculative_tokens / self.speculative_steps if self.speculative_steps else 0.0


def worst_case_blocks(request: Request, slack: int, block_size: int) -> int:
    """KV blocks a request may hold at most: each sample's prompt + max_tokens + `slack` positions."""
    return -(-(len(request.prompt) + request.params.max_new_tokens + slack) // block_size) * request.n


def check_request(request: Request, max_context: int, blocks_needed: int, num_blocks: int) -> None:
    """What makes a request unservable, whoever runs it (ValueError: HTTP 400)."""
    if len(request.prompt) + request.params.max_new_tokens > max_context:
        raise ValueError(f"prompt ({len(request.prompt)}) + max_tokens ({request.params.max_new_tokens}) "
                         f"exceeds the context ({max_context})")
    if blocks_needed > num_blocks:
        raise ValueError("request needs more KV blocks than the pool has")
    if request.params.max_new_tokens < 1 and not request.prompt_logprobs:
        raise ValueError("max_tokens must be positive (0 only to score the prompt)")
