"""The scheduler in a process of its own, behind the HTTP server.

In one process the HTTP event loop (SSE chunks, JSON, detokenization) and the scheduler's host work (graph
launches, token bookkeeping) take turns on one interpreter lock, and at GPU speed each waits for the other
(docs/BENCHMARKS.md, issue 17). Here the scheduler runs in a child process (spawned: CUDA does not survive
a fork) and the two talk over pipes: requests and cancellations one way, every step's events in one
message the other way, with a snapshot of the scheduler's counters for /metrics. `EngineClient` stands
in for the `Scheduler` the server would otherwise hold (submit, cancel, stats, queue depth, pool use).

What the client checks itself, since it cannot wait for the child: a request the scheduler would refuse
(context, KV blocks, max_tokens: the same `check_request`), and the bounded queue, as requests in
flight beyond `max_running` samples (the child never refuses one: its own queue has no bound).
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from dataclasses import fields
from typing import Any

from core.errors import UserError
from runtime.metrics import PoolCounters
from runtime.scheduler import EngineGone, QueueFull, Request, SchedulerStats, check_request, worst_case_blocks

STATS_FIELDS = tuple(f.name for f in fields(SchedulerStats))


class EngineClient:
    def __init__(self, cfg: Any, start_timeout_s: float = 900.0):
        """Spawn the child, which builds the scheduler from the server's config (`runtime.serve`), and wait
        until it is ready (its model loaded and its graphs captured)."""
        ctx = multiprocessing.get_context("spawn")
        self._commands, child_commands = ctx.Pipe(duplex=False)[::-1]  # (send end here, receive end there)
        child_events, self._events = ctx.Pipe(duplex=False)[::-1]
        self.process = ctx.Process(target=_engine_main, args=(cfg, child_commands, child_events),
                                   name="shrinkwrap-engine", daemon=True)
        self.process.start()
        child_commands.close()
        child_events.close()
        if not self._events.poll(start_timeout_s):
            self.process.terminate()
            raise UserError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            kind, info = self._events.recv()
        except EOFError:
            raise UserError(f"the engine process exited with status {self.process.join(5) or self.process.exitcode}"
                            ) from None
        if kind == "error":
            self.process.join(10)
            raise UserError(info)
        self.max_context, self.max_running, self.max_queue = info["max_context"], info["max_running"], info["max_queue"]
        self.k, self.slack, self.block_size = info["k"], info["slack"], info["block_size"]
        self.draft = None
        self.pool = PoolCounters(info["num_blocks"])  # as of the child's last message
        self.stats = SchedulerStats()
        self.running: list[None] = []  # one entry per running sample, as of the last message (for /metrics)
        self.waiting: list[None] = []
        self._live: dict[int, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # submit (event loop) and the reader thread share _live and the pipe
        self._reader: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="engine-events", daemon=True)
        self._reader.start()

    def submit(self, request: Request) -> None:
        check_request(request, self.max_context, worst_case_blocks(request, self.slack, self.block_size),
                      self.pool.num_blocks)
        if not self.alive:
            raise EngineGone(f"the engine process is not running (exit status {self.process.exitcode})")
        request.start()
        with self._lock:
            in_flight = sum(r.n for r in self._live.values())
            if in_flight + request.n > self.max_running + self.max_queue:
                raise QueueFull(f"queue full ({self.max_queue} waiting)")
            rid = next(self._ids)
            self._live[rid] = request
            request._engine_id = rid  # type: ignore[attr-defined]
            self._commands.send(("submit", rid, request.prompt, request.params, request.n, request.priority,
                                 request.logprobs, request.prompt_logprobs, request.cache_key))

    def cancel(self, request: Request) -> None:
        """The child frees its blocks at its next step; nothing more of it is delivered here."""
        request.cancelled = True
        rid = getattr(request, "_engine_id", None)
        with self._lock:
            if self._live.pop(rid, None) is not None:
                self._commands.send(("cancel", rid))

    def stop(self) -> None:
        try:
            with self._lock:
                self._commands.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
        if self._reader is not None:
            self._reader.join(5)

    def _read(self) -> None:
        """The reader thread: each message is one step's events, handed to their requests in order."""
        while True:
            try:
                events, snapshot = self._events.recv()
            except (EOFError, OSError):
                break
            self._apply(snapshot)
            for rid, kind, index, token, reason, logprob, top, scores in events:
                request = self._live.get(rid)
                if request is None:
                    continue
                if scores is not None:
                    request.prompt_scores = scores
                if kind == "token":
                    request.emit(index, token, logprob, top)
                else:
                    request.finish(index, reason)
                    if request.finished == request.n:
                        with self._lock:
                            self._live.pop(rid, None)
        with self._lock:  # the child is gone: end what it was running rather than leave clients waiting
            orphans, self._live = list(self._live.values()), {}
        for request in orphans:
            for index in range(request.n):
                if request.finish_reasons[index] is None:
                    request.finish(index, "abort")

    def _apply(self, snapshot: tuple) -> None:
        stats, running, waiting, used, prefix_hits = snapshot
        self.stats = SchedulerStats(**dict(zip(STATS_FIELDS, stats, strict=True)))
        self.running, self.waiting = [None] * running, [None] * waiting
        self.pool.used, self.pool.prefix_hits = used, prefix_hits


def _engine_main(cfg: Any, commands: Any, events: Any) -> None:
    """The child: build the scheduler, then alternate between the pipe's commands and scheduler steps."""
    import functools

    from runtime.serve import build_scheduler

    try:
        scheduler = build_scheduler(cfg)
    except Exception as exc:  # noqa: BLE001 - whatever stops the start is the user's to read
        events.send(("error", str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"))
        return
    scheduler.max_queue = 1 << 30  # the client bounds the queue
    events.send(("ready", {"max_context": scheduler.max_context, "max_running": scheduler.max_running,
                           "max_queue": cfg.max_queue, "k": scheduler.k, "slack": scheduler.slack,
                           "block_size": scheduler.pool.block_size, "num_blocks": scheduler.pool.num_blocks}))
    outbox: list[tuple] = []
    last: tuple = ()
    live: dict[int, Request] = {}
    sent_scores: set[int] = set()

    def on_event(rid: int, event: Any) -> None:
        request = live.get(rid)
        if request is None:  # cancelled
            return
        scores = None
        if request.prompt_scores is not None and rid not in sent_scores:
            scores = request.prompt_scores
            sent_scores.add(rid)
        outbox.append((rid, event.kind, event.index, event.token, event.finish_reason, event.logprob,
                       event.top_logprobs, scores))
        if event.kind == "done" and request.finished == request.n:
            live.pop(rid, None)
            sent_scores.discard(rid)

    while True:
        busy = scheduler.running or scheduler.waiting or scheduler.pending_siblings
        while commands.poll(0 if busy else None):
            try:
                command = commands.recv()
            except EOFError:  # the server is gone (terminated): nothing left to serve
                return
            if command[0] == "stop":
                return
            if command[0] == "cancel":
                if command[1] in live:
                    scheduler.cancel(live.pop(command[1]))
                continue
            rid, prompt, params, n, priority, logprobs, prompt_logprobs, cache_key = command[1:]
            request = Request(prompt, params, n=n, priority=priority, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, cache_key=cache_key)
            request.on_event = functools.partial(on_event, rid)
            live[rid] = request
            try:
                scheduler.submit(request)  # checked by the client; a cached answer is replayed into the outbox
            except (ValueError, QueueFull):  # not expected: the client checked it; end it rather than hang
                request.start()
                for index in range(n):
                    request.finish(index, "abort")
            busy = True
        scheduler.step()
        stats = scheduler.stats
        snapshot = (tuple(getattr(stats, name) for name in STATS_FIELDS), len(scheduler.running),
                    len(scheduler.waiting), scheduler.pool.used, scheduler.pool.prefix_hits)
        if outbox or snapshot[1:] != last[1:]:  # tokens, or a change /metrics shows (a cancelled request freed)
            events.send((outbox, snapshot))
            outbox, last = [], snapshot
