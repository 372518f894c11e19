"""The scheduler in a process of its own, behind the HTTP server.

In one process the HTTP event loop (SSE chunks, JSON, detokenization) and the scheduler's host work (graph
launches, token bookkeeping) take turns on one interpreter lock, and at GPU speed each waits for the other
(docs/BENCHMARKS.md, issue 17). Here the scheduler runs in a child process (spawned: CUDA does not survive
a fork) and the two talk over pipes: requests and cancellations one way, every step's events in one
message the other way, with a snapshot of the scheduler's counters for /metrics. `EngineClient` stands
in for the `Scheduler` the server would otherwise hold (submit, cancel, stats, queue depth, pool use).
One engine process can serve several HTTP front-end processes (`runtime.front_ends`), each over its own
pipes.

What the client checks itself, since it cannot wait for the child: a request the scheduler would refuse
(context, KV blocks, max_tokens: the same `check_request`), and the bounded queue, as samples in flight
(over all front ends, in shared memory) beyond `max_running` (the child never refuses one: its own queue
has no bound).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from core.errors import UserError
from runtime.metrics import PoolCounters
from runtime.requests import EngineGone, QueueFull, Request, SchedulerStats, check_request, worst_case_blocks

STATS_FIELDS = tuple(f.name for f in fields(SchedulerStats))


@dataclass
class EngineLink:
    """One front end's connection to the engine process (picklable into a spawned front end): its two pipe
    ends, the engine's limits, its place among the front ends (its request ids are `index` mod `count`), and
    the samples in flight over all front ends (shared memory), which bounds the queue."""

    commands: Connection  # send end
    events: Connection  # receive end
    info: dict[str, Any]
    index: int
    count: int
    in_flight: Any  # multiprocessing.Value("q")


def start_engine(cfg: Any, front_ends: int = 1, start_timeout_s: float = 900.0) -> tuple[BaseProcess, list[EngineLink]]:
    """Spawn the engine process, which builds the scheduler from the server's config (`runtime.serve`), with
    one pair of pipes per front end; wait until it is ready (its model loaded and its graphs captured)."""
    ctx = multiprocessing.get_context("spawn")
    pipes = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)) for _ in range(front_ends)]
    # Pipe(duplex=False) gives (receive end, send end): commands go front end -> engine, events the other way
    child_ends = [(commands[0], events[1]) for commands, events in pipes]
    with role("engine process"):
        process = ctx.Process(target=_engine_main, args=(cfg, child_ends), name="shrinkwrap-engine", daemon=True)
        process.start()
    for commands, events in child_ends:
        commands.close()
        events.close()
    in_flight = ctx.Value("q", 0)
    links = []
    for index, (commands, events) in enumerate(pipes):
        if not events[0].poll(start_timeout_s):
            process.terminate()
            raise UserError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            kind, info = events[0].recv()
        except EOFError:
            raise UserError(f"the engine process exited with status {process.join(5) or process.exitcode}") from None
        if kind == "error":
            process.join(10)
            raise UserError(info)
        links.append(EngineLink(commands[1], events[0], info, index, front_ends, in_flight))
    return process, links


@contextlib.contextmanager
def role(name: str) -> Iterator[None]:
    """Name the processes spawned inside (their environment's SHRINKWRAP_ROLE), so `runtime.bench` can say
    which of them was busy."""
    old = os.environ.get("SHRINKWRAP_ROLE")
    os.environ["SHRINKWRAP_ROLE"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["SHRINKWRAP_ROLE"]
        else:
            os.environ["SHRINKWRAP_ROLE"] = old


class EngineClient:
    def __init__(self, link: EngineLink, process: BaseProcess | None = None):
        """A front end's stand-in for the scheduler over `link`; `process` where this front end owns the
        engine process (one front end: it stops the engine when it stops)."""
        self.link, self.process = link, process
        info = link.info
        self.max_context, self.max_running, self.max_queue = info["max_context"], info["max_running"], info["max_queue"]
        self.k, self.slack, self.block_size = info["k"], info["slack"], info["block_size"]
        self.draft = None
        self.pool = PoolCounters(info["num_blocks"])  # as of the engine's last message
        self.stats = SchedulerStats()
        self.running: list[None] = []  # one entry per running sample, as of the last message (for /metrics)
        self.waiting: list[None] = []
        self._commands, self._events = link.commands, link.events
        self._live: dict[int, Request] = {}
        self._ids = itertools.count(link.index, link.count)
        self._lock = threading.Lock()  # submit (event loop) and the reader thread share _live and the pipe
        self._reader: threading.Thread | None = None
        self._gone = False  # the engine's events pipe has closed

    @classmethod
    def spawn(cls, cfg: Any) -> EngineClient:
        """The one front end of an engine process of its own."""
        process, (link,) = start_engine(cfg)
        return cls(link, process)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        return not self._gone and (self.process is None or self.process.is_alive())

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="engine-events", daemon=True)
        self._reader.start()

    def submit(self, request: Request) -> None:
        check_request(request, self.max_context, worst_case_blocks(request, self.slack, self.block_size),
                      self.pool.num_blocks)
        if not self.alive:
            status = f" (exit status {self.process.exitcode})" if self.process is not None else ""
            raise EngineGone(f"the engine process is not running{status}")
        request.start()
        with self._lock:
            with self.link.in_flight.get_lock():  # over all front ends
                if self.link.in_flight.value + request.n > self.max_running + self.max_queue:
                    raise QueueFull(f"queue full ({self.max_queue} waiting)")
                self.link.in_flight.value += request.n
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
            if self._release(rid):
                self._commands.send(("cancel", rid))

    def _release(self, rid: Any) -> bool:
        """Forget a request (under `_lock`); its samples leave the shared count."""
        request = self._live.pop(rid, None)
        if request is not None:
            with self.link.in_flight.get_lock():
                self.link.in_flight.value -= request.n
        return request is not None

    def stop(self) -> None:
        """Stop the engine where this front end owns it; else only leave it (it ends when every front end has)."""
        try:
            with self._lock:
                if self.process is not None:
                    self._commands.send(("stop",))
                else:
                    self._commands.close()
        except (BrokenPipeError, OSError):
            pass
        if self.process is not None:
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
                            self._release(rid)
        self._gone = True
        with self._lock:  # the engine is gone: end what it was running rather than leave clients waiting
            orphans = list(self._live.values())
            for rid in list(self._live):
                self._release(rid)
        for request in orphans:
            for index in range(request.n):
                if request.finish_reasons[index] is None:
                    request.finish(index, "abort")

    def _apply(self, snapshot: tuple) -> None:
        stats, running, waiting, used, prefix_hits = snapshot
        self.stats = SchedulerStats(**dict(zip(STATS_FIELDS, stats, strict=True)))
        self.running, self.waiting = [None] * running, [None] * waiting
        self.pool.used, self.pool.prefix_hits = used, prefix_hits


def _engine_main(cfg: Any, links: list[tuple[Connection, Connection]]) -> None:
    """The engine: build the scheduler, then alternate between the front ends' commands and scheduler steps;
    each step's events go to the front end that sent their request (request id mod the front-end count)."""
    import functools
    import signal

    from runtime.serve import build_scheduler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front ends end, then this
    try:
        scheduler = build_scheduler(cfg)
    except Exception as exc:  # noqa: BLE001 - whatever stops the start is the user's to read
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        for _, events in links:
            events.send(("error", message))
        return
    scheduler.max_queue = 1 << 30  # the front ends bound the queue
    for _, events in links:
        events.send(("ready", {"max_context": scheduler.max_context, "max_running": scheduler.max_running,
                               "max_queue": cfg.max_queue, "k": scheduler.k, "slack": scheduler.slack,
                               "block_size": scheduler.pool.block_size, "num_blocks": scheduler.pool.num_blocks}))
    count = len(links)
    front_end = {commands: index for index, (commands, _) in enumerate(links)}
    outboxes: list[list[tuple]] = [[] for _ in links]
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
        outboxes[rid % count].append((rid, event.kind, event.index, event.token, event.finish_reason,
                                      event.logprob, event.top_logprobs, scores))
        if event.kind == "done" and request.finished == request.n:
            live.pop(rid, None)
            sent_scores.discard(rid)

    def leave(commands: Connection) -> None:
        """A front end is gone: drop its requests (their blocks free at the next step) and its pipes."""
        index = front_end.pop(commands)
        for rid in [rid for rid in live if rid % count == index]:
            scheduler.cancel(live.pop(rid))
        links[index][1].close()

    def handle(command: tuple) -> bool:
        """False on `stop`."""
        if command[0] == "stop":
            return False
        if command[0] == "cancel":
            if command[1] in live:
                scheduler.cancel(live.pop(command[1]))
            return True
        rid, prompt, params, n, priority, logprobs, prompt_logprobs, cache_key = command[1:]
        request = Request(prompt, params, n=n, priority=priority, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, cache_key=cache_key)
        request.on_event = functools.partial(on_event, rid)
        live[rid] = request
        try:
            scheduler.submit(request)  # checked by the front end; a cached answer is replayed into the outbox
        except (ValueError, QueueFull):  # not expected: the front end checked it; end it rather than hang
            request.start()
            for index in range(n):
                request.finish(index, "abort")
        return True

    while True:
        busy = scheduler.running or scheduler.waiting or scheduler.pending_siblings
        for commands in wait(list(front_end), 0 if busy else None):
            while commands in front_end and commands.poll(0):
                try:
                    command = commands.recv()
                except EOFError:  # this front end is gone (stopped or terminated)
                    leave(commands)
                    break
                if not handle(command):
                    return
        if not front_end:  # every front end is gone: nothing left to serve
            return
        scheduler.step()
        stats = scheduler.stats
        snapshot = (tuple(getattr(stats, name) for name in STATS_FIELDS), len(scheduler.running),
                    len(scheduler.waiting), scheduler.pool.used, scheduler.pool.prefix_hits)
        changed = snapshot[1:] != last[1:]  # a change /metrics shows (a cancelled request freed)
        for index in front_end.values():
            if outboxes[index] or changed:
                with contextlib.suppress(BrokenPipeError, OSError):  # gone: its commands pipe says so next
                    links[index][1].send((outboxes[index], snapshot))
                outboxes[index] = []
        last = snapshot
