"""`python -m runtime.serve`: an OpenAI-compatible server over the continuous-batching scheduler.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming, n, stop, seed, temperature,
top_p, top_k, logprobs, echo, penalties, logit_bias, batched prompts), /v1/models, /health,
/metrics (Prometheus). PyTorch artifacts run on the paged engine (with --draft, speculatively);
ONNX exports on ONNX Runtime with batched decode steps. Bad requests get a 400 with an
OpenAI-style error body that names the field, a full queue a 429; a client that goes away has its
KV blocks freed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from core.config import field, parse_config
from core.errors import UserError, run_main
from core.family import require
from runtime.engine import Engine, SamplingParams
from runtime.loading import check_draft_target, is_onnx_export, load_model, load_tokenizer, read_config
from runtime.metrics import SchedulerCollector
from runtime.onnx_backend import OnnxDecoder
from runtime.onnx_batch import OnnxBatchRunner
from runtime.openai_api import (
    ChatRequest,
    CompletionRequest,
    TextStream,
    chat_logprob,
    check_unicode,
    completion_logprobs,
    error_body,
    new_id,
    now,
)
from runtime.requests import EngineGone, Event, QueueFull, Request
from runtime.scheduler import Scheduler


@dataclass
class ServeConfig:
    artifact: str = field(None, help="model artifact directory")
    host: str = field("127.0.0.1", help="address to bind (loopback unless told otherwise)")
    port: int = field(8000, help="TCP port")
    model_name: str | None = field(None, help="the model id clients must send (default: the artifact's folder name)")
    draft: str | None = field(None, help="draft artifact for speculative decoding (same tokenizer)")
    k: int = field(4, help="draft tokens proposed per target step")
    draft_max_batch: int | None = field(None, help="draft only while at most this many sequences decode (default: "
                                        "1 on the CPU, where extra verify rows cost nearly a step each; no limit "
                                        "on CUDA)")
    force: bool = field(False, help="use a draft artifact made for another target")
    device: str = field("cpu", help="cpu or cuda")
    threads: int | None = field(None, help="torch intra-op threads")
    max_running: int = field(16, help="sequences decoded together at most")
    max_queue: int = field(64, help="requests waiting at most (beyond: HTTP 429)")
    max_batch_tokens: int = field(256, help="tokens per forward step (decodes + prompt chunks)")
    max_model_len: int | None = field(None, help="context limit (default: the model's, bounded by the KV pool)")
    block_size: int = field(16, help="tokens per KV-cache block")
    num_blocks: int = field(2048, help="KV-cache blocks in the pool")
    response_cache: int = field(256, help="greedy responses memoised, keyed by every setting that shapes them "
                                "(0 disables)")
    decode_steps: int | None = field(None, help="greedy decode steps per device call while no prompt waits "
                                     "(default: 8 on CUDA, 1 on the CPU; tokens then stream in bursts)")
    log_level: str = field("warning", help="uvicorn log level", choices=("critical", "error", "warning", "info"))
    loop: str = field("auto", help="event loop (auto: uvloop where installed)", choices=("auto", "asyncio", "uvloop"))
    http: str = field("auto", help="HTTP parser (auto: httptools where installed)", choices=("auto", "h11", "httptools"))
    engine_process: bool | None = field(None, help="run the scheduler in a process of its own, so the HTTP side "
                                        "and the scheduler's host work do not share one interpreter lock "
                                        "(default: on CUDA)")
    api_processes: int | None = field(None, help="HTTP front-end processes over the one engine process (more than "
                                      "one: the engine runs in a process of its own; default: 2 on CUDA, where one "
                                      "front end cannot keep up with the engine, else 1)")
    gil_switch_ms: float = field(0.5, help="longest hold of the interpreter while another thread waits (Python's "
                                 "default: 5): after each device call the scheduler thread waits behind the HTTP "
                                 "event loop at most this long")

    def validate(self) -> None:
        if not self.artifact:
            raise UserError("artifact: required")
        if not 0 < self.port < 65536:
            raise UserError(f"port: must be in 1..65535, got {self.port}")
        for name in ("max_running", "max_batch_tokens", "block_size", "num_blocks", "k", "decode_steps",
                     "draft_max_batch", "api_processes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive")
        if self.max_queue < 0 or self.response_cache < 0:
            raise UserError("max_queue and response_cache must be >= 0")
        if self.api_processes is None:
            self.api_processes = 2 if self.device.startswith("cuda") and self.engine_process is not False else 1
        if self.api_processes > 1 and self.engine_process is False:
            raise UserError("api_processes: more than one front end needs the engine in a process of its own "
                            "(drop --no-engine-process)")
        if not 0 < self.gil_switch_ms <= 100:
            raise UserError(f"gil_switch_ms: must be in (0, 100], got {self.gil_switch_ms}")


@dataclass
class Job:
    """One prompt of a request: what the scheduler runs, one text stream per sample, what echo returns."""

    request: Request
    streams: list[TextStream]
    prompt_text: str


class Server:
    """The scheduler, tokenizer and metrics behind the HTTP app."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.stop_ids = tuple(t for t in {tokenizer.eos_token_id} if t is not None)
        self.vocab = len(tokenizer)
        self._token_text: dict[int, str] = {}
        self._pumps: dict[asyncio.AbstractEventLoop, EventPump] = {}
        self.registry = CollectorRegistry()
        self.registry.register(SchedulerCollector(scheduler))
        self.exposed = self.registry  # what /metrics shows
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # one of several front ends: add up theirs
            from prometheus_client.multiprocess import MultiProcessCollector

            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)
            self.exposed.register(SchedulerCollector(scheduler))
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("shrinkwrap_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=self.registry)
        self.latency = Histogram("shrinkwrap_request_latency_seconds", "Request latency", buckets=buckets,
                                 registry=self.registry)
        self.responses = Counter("shrinkwrap_responses", "Responses by HTTP status", ["status"],
                                 registry=self.registry)

    def token_text(self, token: int) -> str:
        """A token as text in logprobs (special tokens spelled out)."""
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _tokenize(self, what: str, text: str) -> list[int]:
        try:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer refuses is the client's input
            raise ValueError(f"{what}: cannot be tokenized ({type(exc).__name__})") from None

    def prompts(self, body: CompletionRequest | ChatRequest, echo: bool = True) -> list[tuple[list[int], str]]:
        """(token ids, text that echo returns: only with `echo`) per prompt of the request."""
        if isinstance(body, ChatRequest):
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            try:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template that rejects these messages
                raise ValueError(f"messages: the chat template refused them ({type(exc).__name__})") from None
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            return [(ids, "")]
        out = []
        prompts = body.prompts()
        for i, prompt in enumerate(prompts):
            where = prompt_name(i, len(prompts))
            if isinstance(prompt, str):
                out.append((self._tokenize(where, prompt), prompt))
                continue
            if any(not 0 <= t < self.vocab for t in prompt):
                raise ValueError(f"{where}: token ids must be in [0, {self.vocab})")
            out.append((list(prompt), self.tokenizer.decode(prompt, skip_special_tokens=False) if echo else ""))
        return out

    def make_jobs(self, body: CompletionRequest | ChatRequest) -> list[Job]:
        if body.model != self.model_name:
            raise ValueError(f"model: {body.model!r} is not served here (this server has {self.model_name!r})")
        check_unicode(body)
        bias = tuple(sorted((int(t), float(b)) for t, b in (body.logit_bias or {}).items()))
        if any(t >= self.vocab for t, _ in bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {self.vocab})")
        top_n, echo = body.top_logprobs_count(), body.echo_prompt()
        jobs = []
        prompts = self.prompts(body, echo)
        for i, (prompt, text) in enumerate(prompts):
            where = prompt_name(i, len(prompts))
            if not prompt:
                raise ValueError(f"{where}: empty")
            room = self.scheduler.max_context - len(prompt)
            if room < 1:
                raise ValueError(f"{where}: {len(prompt)} tokens; the context is {self.scheduler.max_context}")
            max_tokens = body.new_tokens() if body.new_tokens() is not None else room
            if max_tokens > room:
                raise ValueError(f"max_tokens: {max_tokens} + prompt {len(prompt)} tokens exceeds the context "
                                 f"({self.scheduler.max_context})")
            params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, stop_ids=self.stop_ids,
                                    presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty, logit_bias=bias)
            stops = body.stop_strings()
            # greedy output is a function of all of this; sampled output is not cached (see README)
            key = ((self.model_name, tuple(prompt), max_tokens, body.top_p, body.top_k, body.presence_penalty,
                    body.frequency_penalty, bias, tuple(stops), body.n, top_n, echo, self.stop_ids)
                   if body.temperature <= 0 else None)
            request = Request(prompt, params, n=body.n, priority=body.priority, logprobs=top_n,
                              prompt_logprobs=echo and top_n is not None, cache_key=key)
            jobs.append(Job(request, [TextStream(self.tokenizer, stops) for _ in range(body.n)], text))
        return jobs

    def _pump(self, loop: asyncio.AbstractEventLoop) -> EventPump:
        if loop not in self._pumps:
            self._pumps[loop] = EventPump(loop)
        return self._pumps[loop]

    async def run(self, jobs: list[Job], disconnected) -> AsyncIterator[tuple]:
        """Submit every job; yield (choice index, text delta, finish_reason, logprob entries) until every
        sample is done or stopped. Choice index = prompt index * n + sample index, as OpenAI numbers them."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        started = time.monotonic()
        submitted = []
        try:
            for j, job in enumerate(jobs):
                job.request.on_event = functools.partial(self._pump(loop).put, events, j)
                self.scheduler.submit(job.request)  # QueueFull / ValueError go to the caller
                submitted.append(job.request)
        except Exception:
            for request in submitted:
                self.scheduler.cancel(request)
            raise
        n = jobs[0].request.n
        open_samples = {(j, i) for j in range(len(jobs)) for i in range(n)}
        pending: dict[tuple[int, int], list] = {key: [] for key in open_samples}
        first = True
        try:
            while open_samples:
                try:
                    burst = [await asyncio.wait_for(events.get(), timeout=1.0)]
                except TimeoutError:
                    if await disconnected():
                        return
                    continue
                while not events.empty():  # everything already here leaves as one chunk per sample
                    burst.append(events.get_nowait())
                deltas: dict[tuple[int, int], str] = {}
                unpushed: dict[tuple[int, int], list[int]] = {}  # no stop strings: one push per sample and burst
                for j, event in burst:
                    key = (j, event.index)
                    if key not in open_samples:
                        continue
                    stream, index = jobs[j].streams[event.index], j * n + event.index
                    if event.kind == "token":
                        if first:
                            self.ttft.observe(time.monotonic() - started)
                            first = False
                        pending[key].append((event.token, event.logprob, event.top_logprobs))
                        if not stream.stops:
                            unpushed.setdefault(key, []).append(event.token)
                            continue
                        delta = stream.push(event.token)
                        if stream.stopped:
                            open_samples.discard(key)
                            yield index, deltas.pop(key, "") + delta + stream.flush(), "stop", pending.pop(key)
                        elif delta:
                            deltas[key] = deltas.get(key, "") + delta
                    else:
                        open_samples.discard(key)
                        text = stream.push(*unpushed.pop(key)) if key in unpushed else ""
                        yield index, deltas.pop(key, "") + text + stream.flush(), event.finish_reason, pending.pop(key)
                for key, tokens in unpushed.items():
                    delta = jobs[key[0]].streams[key[1]].push(*tokens)
                    if delta:
                        deltas[key] = deltas.get(key, "") + delta
                for (j, i), text in deltas.items():
                    yield j * n + i, text, None, pending[(j, i)]
                    pending[(j, i)] = []
            self.latency.observe(time.monotonic() - started)
        finally:
            for job in jobs:
                if job.request.finished < job.request.n:
                    self.scheduler.cancel(job.request)  # client gone or stop string hit: free the blocks now


def prompt_name(index: int, count: int) -> str:
    """How errors name one prompt of a request: `prompt`, or `prompt.i` in a batch."""
    return "prompt" if count == 1 else f"prompt.{index}"


NAMED_FIELD = re.compile(r"([\w.]+): ")  # our 400 messages start with the field they are about


class EventPump:
    """Hands the scheduler thread's events to the event loop, waking it once per burst rather than once per
    token (at 64 streams a wake-up per token costs the loop more than the tokens)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, tuple[int, Event]]] = []
        self.lock = threading.Lock()

    def put(self, events: asyncio.Queue, job: int, event: Event) -> None:
        """Called on the scheduler thread."""
        with self.lock:
            self.items.append((events, (job, event)))
            if len(self.items) > 1:
                return  # a drain is already scheduled
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for events, item in items:
            events.put_nowait(item)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="Shrinkwrap", version="0.1.0")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        named = NAMED_FIELD.match(message) if status == 400 else None
        server.responses.labels(str(status)).inc()
        return JSONResponse(error_body(message, kind, param or (named.group(1) if named else None)),
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        message = ("not supported by this server" if first.get("type") == "extra_forbidden" else
                   str(first.get("msg", "invalid")).removeprefix("Value error, ")[:300])
        if loc is None and NAMED_FIELD.match(message):  # a check across fields names its field first
            return error(400, message)
        return error(400, f"{loc or 'body'}: {message}", param=loc)

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                     "server_error")

    @app.exception_handler(Exception)
    async def crash(_: HttpRequest, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        if not getattr(server.scheduler, "alive", True):  # the engine process is gone: let the orchestrator know
            return error(503, "the engine process is not running", "server_error")
        return {"status": "ok", "model": server.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "shrinkwrap"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.exposed), media_type=CONTENT_TYPE_LATEST)

    async def handle(body: CompletionRequest | ChatRequest, http: HttpRequest, chat: bool):
        try:
            jobs = server.make_jobs(body)
            generator = server.run(jobs, http.is_disconnected)
            first = await anext(generator, None)  # submits: a full queue or a bad request fails here
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error")
        except EngineGone as exc:
            return error(503, str(exc), "server_error")
        except ValueError as exc:
            return error(400, str(exc)[:500])
        rid, created, n = new_id("chatcmpl" if chat else "cmpl"), now(), body.n
        kind = "chat.completion" if chat else "text_completion"
        top_n = body.top_logprobs_count()
        echo = not chat and body.echo_prompt()
        choices_count = len(jobs) * n

        def job_of(index: int) -> Job:
            return jobs[index // n]

        def logprobs(index: int, entries: list, with_prompt: bool, offset: int) -> dict[str, Any] | None:
            if top_n is None:
                return None
            if chat:
                return {"content": [chat_logprob(server.token_text, t, lp, top) for t, lp, top in entries], "refusal": None}
            if with_prompt:
                request = job_of(index).request
                scores = request.prompt_scores or []
                entries = ([(request.prompt[0], None, None)] +
                           [(t, lp, top) for t, (lp, top) in zip(request.prompt[1:], scores, strict=True)] + entries)
            return completion_logprobs(server.token_text, entries, offset)

        def chunk(choice: dict[str, Any]) -> str:
            payload = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                       "model": server.model_name, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return _sse(payload)

        include_usage = body.stream and body.stream_options is not None and body.stream_options.include_usage
        if body.stream:
            async def events() -> AsyncIterator[str]:
                try:
                    offsets = [0] * choices_count
                    for index in range(choices_count):  # role first (chat) or the echoed prompt (completions)
                        if chat:
                            yield chunk({"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None})
                        elif echo:
                            text = job_of(index).prompt_text
                            yield chunk({"index": index, "text": text, "finish_reason": None,
                                         "logprobs": logprobs(index, [], True, 0)})
                            offsets[index] = len(text)
                    item = first
                    while item is not None:
                        index, text, reason, entries = item
                        lp = logprobs(index, entries, False, offsets[index])
                        offsets[index] += len(text)
                        yield chunk({"index": index, "delta": {"content": text} if text else {}, "logprobs": lp,
                                     "finish_reason": reason} if chat else
                                    {"index": index, "text": text, "logprobs": lp, "finish_reason": reason})
                        item = await anext(generator, None)
                    if include_usage:
                        yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                    "model": server.model_name, "choices": [], "usage": usage(jobs)})
                    yield "data: [DONE]\n\n"
                finally:
                    await generator.aclose()
            server.responses.labels("200").inc()
            return StreamingResponse(events(), media_type="text/event-stream")
        texts, reasons = [""] * choices_count, [None] * choices_count
        entries: list[list] = [[] for _ in range(choices_count)]
        item = first
        while item is not None:
            index, text, reason, new = item
            texts[index] += text
            entries[index] += new
            reasons[index] = reason or reasons[index]
            item = await anext(generator, None)
        if any(r is None for r in reasons):  # the client went away before the end
            return error(499, "client closed the request")
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs(i, entries[i], False, 0), "finish_reason": reason})
            else:
                prefix = job_of(i).prompt_text if echo else ""
                choices.append({"index": i, "text": prefix + text, "finish_reason": reason,
                                "logprobs": logprobs(i, entries[i], echo, 0)})
        server.responses.labels("200").inc()
        return {"id": rid, "object": kind, "created": created, "model": server.model_name, "choices": choices,
                "usage": usage(jobs)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await handle(body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        return await handle(body, http, chat=True)

    return app


def usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(len(job.request.prompt) for job in jobs)
    completion = sum(len(s.tokens) for job in jobs for s in job.streams)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_server(cfg: ServeConfig) -> Server:
    """Load the model and start the scheduler: on a thread here, or in a process of its own."""
    from runtime.trtllm_backend import import_trtllm, is_trtllm_engine

    if is_trtllm_engine(cfg.artifact):  # TensorRT-LLM's executor batches in flight behind the same API
        import_trtllm()
        if cfg.draft is not None:
            raise UserError("draft: speculative serving of TensorRT-LLM engines is not wired here")
        from runtime.trtllm_backend import TrtllmScheduler  # pragma: no cover - needs TensorRT-LLM

        build = json.loads((Path(cfg.artifact) / "config.json").read_text())["build_config"]  # pragma: no cover
        engine_len = build.get("max_seq_len", 2048)
        limit = min(cfg.max_model_len or engine_len, engine_len)
        scheduler = TrtllmScheduler(cfg.artifact, limit, cfg.max_queue)  # pragma: no cover
        scheduler.start()  # pragma: no cover
        return Server(scheduler, load_tokenizer(cfg.artifact), model_name(cfg))  # pragma: no cover
    tokenizer = load_tokenizer(cfg.artifact)
    own_process = cfg.engine_process if cfg.engine_process is not None else cfg.device.startswith("cuda")
    if own_process:
        from runtime.engine_process import EngineClient

        scheduler: Any = EngineClient.spawn(cfg)
    else:
        scheduler = build_scheduler(cfg, tokenizer)
    scheduler.start()
    return Server(scheduler, tokenizer, model_name(cfg))


def model_name(cfg: ServeConfig) -> str:
    return cfg.model_name or Path(cfg.artifact).resolve().name


def build_scheduler(cfg: ServeConfig, tokenizer: Any = None) -> Scheduler:
    """Load the model (and draft) and build the scheduler over it, its graphs captured; not started."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.artifact)
    draft = None
    if is_onnx_export(cfg.artifact, cfg.device):
        if cfg.draft is not None:
            raise UserError("draft: speculative serving runs on PyTorch artifacts, not on an ONNX export")
        decoder = OnnxDecoder(cfg.artifact, cfg.threads)
        max_context = min(cfg.max_model_len or decoder.context_length, decoder.context_length)
        engine: Any = OnnxBatchRunner(decoder, cfg.max_running, max_context)
    else:
        require(read_config(cfg.artifact), "serve")
        if cfg.draft is not None:  # before any model is loaded or graph captured
            from runtime.exit_head import is_exit_head

            check_draft_target(cfg.draft, cfg.artifact, cfg.force)
            if cfg.device.startswith("cuda"):
                print("warning: draft: speculative serving on CUDA is slower than serving without a draft today "
                      "(H200: 0.37-0.66x at 1-64 clients, docs/BENCHMARKS.md issue 19); runtime.generate --static "
                      "--draft is the fast speculative path", file=sys.stderr, flush=True)
            if not is_exit_head(cfg.draft) and load_tokenizer(cfg.draft).get_vocab() != tokenizer.get_vocab():
                raise UserError(f"draft: {cfg.draft} does not share the target's tokenizer")
        model = load_model(cfg.artifact, cfg.device)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "model"):
            raise UserError(f"{cfg.artifact}: the server runs decoder-only PyTorch or ONNX artifacts")
        engine = Engine(model, cfg.block_size, cfg.num_blocks)
        engine.runner.warm_up(cfg.max_running, cfg.max_batch_tokens)
        if cfg.draft is not None:
            from runtime.eagle import is_eagle_draft, load_head
            from runtime.exit_head import load_exit_head

            draft = (load_head(cfg.draft, model) if is_eagle_draft(cfg.draft) else
                     load_exit_head(cfg.draft, model) if is_exit_head(cfg.draft) else
                     Engine(load_model(cfg.draft, cfg.device), cfg.block_size, cfg.num_blocks))
        limit = getattr(model.config, "max_position_embeddings", None) or cfg.block_size * cfg.num_blocks
        max_context = min(cfg.max_model_len or limit, limit, cfg.block_size * cfg.num_blocks)
    decode_steps = cfg.decode_steps or (8 if cfg.device.startswith("cuda") else 1)
    draft_max_batch = cfg.draft_max_batch or (None if cfg.device.startswith("cuda") else 1)
    return Scheduler(engine, max_context, cfg.max_running, cfg.max_queue, cfg.max_batch_tokens,
                     cfg.response_cache, draft=draft, k=cfg.k, decode_steps=decode_steps,
                     draft_max_batch=draft_max_batch)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    cfg = parse_config(ServeConfig, argv, "python -m runtime.serve", __doc__.splitlines()[0])
    if cfg.api_processes > 1:
        from runtime.front_ends import serve_front_ends

        return serve_front_ends(cfg)
    server = build_server(cfg)
    print(f"serving {server.model_name!r} on http://{cfg.host}:{cfg.port} (context {server.scheduler.max_context})",
          flush=True)
    sys.setswitchinterval(cfg.gil_switch_ms / 1e3)
    try:
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level=cfg.log_level, loop=cfg.loop,
                    http=cfg.http)
    finally:
        server.scheduler.stop()


if __name__ == "__main__":
    run_main(main)
