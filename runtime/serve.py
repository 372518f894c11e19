"""`python -m runtime.serve`: an OpenAI-compatible server over the continuous-batching scheduler.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming, n, stop, seed, temperature,
top_p, top_k), /v1/models, /health, /metrics (Prometheus). With --draft, decoding is speculative. Bad requests get a 400 with an
OpenAI-style error body, a full queue a 429; a client that goes away has its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from runtime.config import field, parse_config
from runtime.engine import Engine, SamplingParams
from runtime.errors import UserError, run_main
from runtime.loading import load_model, load_tokenizer
from runtime.openai_api import ChatRequest, CompletionRequest, TextStream, error_body, new_id, now
from runtime.scheduler import Event, QueueFull, Request, Scheduler


@dataclass
class ServeConfig:
    artifact: str = field(None, help="model artifact directory")
    host: str = field("127.0.0.1", help="address to bind (loopback unless told otherwise)")
    port: int = field(8000, help="TCP port")
    model_name: str | None = field(None, help="the model id clients must send (default: the artifact's folder name)")
    draft: str | None = field(None, help="draft artifact for speculative decoding (same tokenizer)")
    k: int = field(4, help="draft tokens proposed per target step")
    device: str = field("cpu", help="cpu or cuda")
    threads: int | None = field(None, help="torch intra-op threads")
    max_running: int = field(16, help="sequences decoded together at most")
    max_queue: int = field(64, help="requests waiting at most (beyond: HTTP 429)")
    max_batch_tokens: int = field(256, help="tokens per forward step (decodes + prompt chunks)")
    max_model_len: int | None = field(None, help="context limit (default: the model's, bounded by the KV pool)")
    block_size: int = field(16, help="tokens per KV-cache block")
    num_blocks: int = field(2048, help="KV-cache blocks in the pool")
    response_cache: int = field(256, help="greedy responses memoised (0 disables)")
    log_level: str = field("warning", help="uvicorn log level", choices=("critical", "error", "warning", "info"))

    def validate(self) -> None:
        if not self.artifact:
            raise UserError("artifact: required")
        if not 0 < self.port < 65536:
            raise UserError(f"port: must be in 1..65535, got {self.port}")
        for name in ("max_running", "max_batch_tokens", "block_size", "num_blocks", "k"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive")
        if self.max_queue < 0 or self.response_cache < 0:
            raise UserError("max_queue and response_cache must be >= 0")


class Server:
    """The scheduler, tokenizer and metrics behind the HTTP app."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
        self.stop_ids = tuple(t for t in {tokenizer.eos_token_id} if t is not None)
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(scheduler))
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("shrinkwrap_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                              registry=self.registry)
        self.latency = Histogram("shrinkwrap_request_latency_seconds", "Request latency", buckets=buckets,
                                 registry=self.registry)
        self.responses = Counter("shrinkwrap_responses", "Responses by HTTP status", ["status"],
                                 registry=self.registry)

    def prompt_ids(self, body: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(body, ChatRequest):
            ids = self.tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                     add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if isinstance(body.prompt, str):
            return self.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in body.prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return list(body.prompt)

    def make_request(self, body: CompletionRequest | ChatRequest) -> tuple[Request, list[TextStream]]:
        if body.model != self.model_name:
            raise ValueError(f"model {body.model!r} is not served here (this server has {self.model_name!r})")
        prompt = self.prompt_ids(body)
        if not prompt:
            raise ValueError("prompt is empty")
        room = self.scheduler.max_context - len(prompt)
        if room < 1:
            raise ValueError(f"prompt is {len(prompt)} tokens; the context is {self.scheduler.max_context}")
        max_tokens = body.max_tokens if body.max_tokens is not None else room
        if max_tokens > room:
            raise ValueError(f"max_tokens {max_tokens} + prompt {len(prompt)} tokens exceeds the context "
                             f"({self.scheduler.max_context})")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                top_k=body.top_k, seed=body.seed, stop_ids=self.stop_ids)
        streams = [TextStream(self.tokenizer, body.stop_strings()) for _ in range(body.n)]
        return Request(prompt, params, n=body.n, priority=body.priority), streams

    async def run(self, request: Request, streams: list[TextStream], disconnected) -> AsyncIterator[tuple]:
        """Submit and yield (index, text delta, finish_reason) until every sample is done or stopped."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request.on_event = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        started = time.monotonic()
        self.scheduler.submit(request)  # QueueFull / ValueError go to the caller
        open_samples = set(range(request.n))
        first = True
        try:
            while open_samples:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await disconnected():
                        return
                    continue
                if event.index not in open_samples:
                    continue
                stream = streams[event.index]
                if event.kind == "token":
                    if first:
                        self.ttft.observe(time.monotonic() - started)
                        first = False
                    delta = stream.push(event.token)
                    if stream.stopped:
                        open_samples.discard(event.index)
                        yield event.index, delta + stream.flush(), "stop"
                    elif delta:
                        yield event.index, delta, None
                else:
                    open_samples.discard(event.index)
                    yield event.index, stream.flush(), event.finish_reason
            self.latency.observe(time.monotonic() - started)
        finally:
            if request.finished < request.n:
                self.scheduler.cancel(request)  # client gone or stop string hit: free the blocks now


class _SchedulerCollector:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler
        gauges = {"queue_depth": ("Requests waiting", s.queue_depth),
                  "running_sequences": ("Sequences being prefilled or decoded", len(s.running)),
                  "kv_blocks_used": ("KV-cache blocks held by sequences", s.pool.used),
                  "kv_blocks_total": ("KV-cache blocks in the pool", s.pool.num_blocks),
                  "decode_tokens_per_second": ("Tokens per second of recent steps", s.stats.decode_tokens_per_s)}
        if s.draft is not None:
            gauges["speculative_acceptance_rate"] = ("Draft tokens accepted / proposed", s.stats.acceptance_rate)
            gauges["speculative_tokens_per_target_step"] = ("Tokens per target pass with a draft",
                                                             s.stats.tokens_per_target_step)
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"shrinkwrap_{name}", doc, value=value)
        counters = {"prefix_cache_hit_blocks": ("KV blocks reused from the prefix cache", s.pool.prefix_hits),
                    "response_cache_hits": ("Greedy requests answered from the response cache",
                                            s.stats.response_cache_hits),
                    "generated_tokens": ("Tokens generated", s.stats.generated_tokens),
                    "prompt_tokens": ("Prompt tokens admitted", s.stats.prompt_tokens),
                    "finished_requests": ("Requests finished", s.stats.finished_requests),
                    "cancelled_requests": ("Requests cancelled (client gone or stop string)",
                                           s.stats.cancelled_requests)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"shrinkwrap_{name}", doc, value=value)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="Shrinkwrap", version="0.1.0")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        server.responses.labels(str(status)).inc()
        return JSONResponse(error_body(message, kind, param), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", param=".".join(loc) or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                     "server_error")

    @app.exception_handler(Exception)
    async def crash(_: HttpRequest, exc: Exception):
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "shrinkwrap"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    async def handle(body: CompletionRequest | ChatRequest, http: HttpRequest, chat: bool):
        try:
            request, streams = server.make_request(body)
            generator = server.run(request, streams, http.is_disconnected)
            first = await anext(generator, None)  # submits: a full queue or a bad request fails here
        except QueueFull as exc:
            return error(429, str(exc), "rate_limit_error")
        except ValueError as exc:
            return error(400, str(exc))
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            async def events() -> AsyncIterator[str]:
                try:
                    if chat:
                        for i in range(body.n):
                            yield _sse({"id": rid, "object": f"{kind}.chunk", "created": created,
                                        "model": server.model_name, "choices": [
                                            {"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
                    item = first
                    while item is not None:
                        index, text, reason = item
                        choice = ({"index": index, "delta": {"content": text} if text else {},
                                   "finish_reason": reason} if chat else
                                  {"index": index, "text": text, "finish_reason": reason, "logprobs": None})
                        yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                    "model": server.model_name, "choices": [choice]})
                        item = await anext(generator, None)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                    "model": server.model_name, "choices": [], "usage": usage(request, streams)})
                    yield "data: [DONE]\n\n"
                finally:
                    await generator.aclose()
            server.responses.labels("200").inc()
            return StreamingResponse(events(), media_type="text/event-stream")
        texts, reasons = [""] * body.n, [None] * body.n
        item = first
        while item is not None:
            index, text, reason = item
            texts[index] += text
            reasons[index] = reason or reasons[index]
            item = await anext(generator, None)
        if any(r is None for r in reasons):  # the client went away before the end
            return error(499, "client closed the request")
        choices = [({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r} if chat else
                    {"index": i, "text": t, "finish_reason": r, "logprobs": None})
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        server.responses.labels("200").inc()
        return {"id": rid, "object": kind, "created": created, "model": server.model_name, "choices": choices,
                "usage": usage(request, streams)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await handle(body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        return await handle(body, http, chat=True)

    return app


def usage(request: Request, streams: list[TextStream]) -> dict[str, int]:
    completion = sum(len(s.tokens) for s in streams)
    return {"prompt_tokens": len(request.prompt), "completion_tokens": completion,
            "total_tokens": len(request.prompt) + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_server(cfg: ServeConfig) -> Server:
    """Load the model and start the scheduler thread."""
    from pathlib import Path

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg.artifact)
    model = load_model(cfg.artifact, cfg.device)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "model"):
        raise UserError(f"{cfg.artifact}: the server runs Llama-family PyTorch artifacts")
    engine = Engine(model, cfg.block_size, cfg.num_blocks)
    draft = None
    if cfg.draft is not None:
        if load_tokenizer(cfg.draft).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"draft: {cfg.draft} does not share the target's tokenizer")
        draft = Engine(load_model(cfg.draft, cfg.device), cfg.block_size, cfg.num_blocks)
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.block_size * cfg.num_blocks
    max_context = min(cfg.max_model_len or limit, limit, cfg.block_size * cfg.num_blocks)
    scheduler = Scheduler(engine, max_context, cfg.max_running, cfg.max_queue, cfg.max_batch_tokens,
                          cfg.response_cache, draft=draft, k=cfg.k)
    scheduler.start()
    return Server(scheduler, tokenizer, cfg.model_name or Path(cfg.artifact).resolve().name)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    cfg = parse_config(ServeConfig, argv, "python -m runtime.serve", __doc__.splitlines()[0])
    server = build_server(cfg)
    print(f"serving {server.model_name!r} on http://{cfg.host}:{cfg.port} (context {server.scheduler.max_context})",
          flush=True)
    try:
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
    finally:
        server.scheduler.stop()


if __name__ == "__main__":
    run_main(main)
