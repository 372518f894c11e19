"""`python -m runtime.bench`: load-test the server on loopback against serial HF `generate`.

Starts `runtime.serve` on a free loopback port (or targets `--url`), sends `--requests` streaming
greedy completions of mixed prompt lengths (L/2 .. 3L/2 tokens of held-out text) from
`--concurrency` clients, bounded in count and in time, and reports throughput, time to first
token and latency p50/p99, and errors by HTTP status; then serves the same requests one at a time
with plain HF `generate` in this process. Writes JSON (default artifacts/bench/serve-<device>.json).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.config import field, parse_config
from core.errors import UserError, run_main


@dataclass
class BenchConfig:
    artifact: str = field(None, help="model artifact to serve (and to run the HF baseline on)")
    url: str | None = field(None, help="target a running server instead of starting one")
    draft: str | None = field(None, help="draft artifact: the started server decodes speculatively")
    k: int = field(4, help="draft tokens per target step (with --draft)")
    force: bool = field(False, help="let the started server use a draft made for another target")
    concurrency: int = field(16, help="clients sending at once")
    requests: int = field(64, help="requests in total")
    prompt_len: int = field(128, help="mean prompt length in tokens (mixed: L/2 .. 3L/2)")
    max_tokens: int = field(64, help="new tokens per request")
    time_limit_s: float = field(900.0, help="stop the load test after this long")
    device: str = field("cpu", help="device for the server and the baseline")
    max_running: int = field(16, help="server: sequences decoded together")
    max_batch_tokens: int = field(256, help="server: tokens per forward step (decodes + prompt chunks)")
    decode_steps: int | None = field(None, help="server: greedy decode steps per device call (default: its own)")
    server_args: str | None = field(None, help="more flags for the started server, written --server-args=\"--flag value\"")
    baseline: bool = field(True, help="also run serial HF generate on the same requests")
    baseline_requests: int | None = field(None, help="run the serial baseline on the first N requests only "
                                          "(it is slow; throughput does not depend on the count)")
    out: str | None = field(None, help="JSON output (default artifacts/bench/serve-<device>.json)")
    seed: int = field(0, help="seed for the prompt mix")

    def validate(self) -> None:
        if not self.artifact:
            raise UserError("artifact: required (the baseline and the tokenizer come from it)")
        if min(self.concurrency, self.requests, self.prompt_len, self.max_tokens) < 1:
            raise UserError("concurrency, requests, prompt_len and max_tokens must be positive")
        if self.baseline_requests is not None and self.baseline_requests < 1:
            raise UserError("baseline_requests: must be positive")


def make_prompts(tokenizer: Any, cfg: BenchConfig) -> list[list[int]]:
    from core.data import load_corpus

    ids = tokenizer("\n\n".join(load_corpus("heldout")), add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(cfg.seed)
    lengths = rng.integers(max(1, cfg.prompt_len // 2), cfg.prompt_len * 3 // 2 + 1, cfg.requests)
    starts = rng.integers(0, len(ids) - lengths.max() - 1, cfg.requests)
    return [ids[s:s + n] for s, n in zip(starts, lengths, strict=True)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


async def load_test(url: str, model: str, prompts: list[list[int]], cfg: BenchConfig) -> dict[str, Any]:
    import httpx

    gate = asyncio.Semaphore(cfg.concurrency)
    statuses: Counter[str] = Counter()
    ttfts, latencies, tokens, itls, decode_rates = [], [], [], [], []

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> None:
        async with gate:
            body = {"model": model, "prompt": prompt, "max_tokens": cfg.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first = None
            arrivals: list[float] = []
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    statuses[str(response.status_code)] += 1
                    if response.status_code != 200:
                        await response.aread()
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk["choices"]:
                            arrivals.append(time.perf_counter())
                            if first is None:
                                first = arrivals[-1] - start
                        if chunk.get("usage"):
                            tokens.append(chunk["usage"]["completion_tokens"])
                latencies.append(time.perf_counter() - start)
                ttfts.append(first if first is not None else latencies[-1])
                itls.extend(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
                if len(arrivals) > 1 and tokens:  # this request's decode rate after its first token
                    decode_rates.append((tokens[-1] - 1) / (arrivals[-1] - arrivals[0]))
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    limits = httpx.Limits(max_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.time_limit_s), limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(client, p)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=cfg.time_limit_s)
        for task in pending:
            task.cancel()
            statuses["unfinished"] += 1
        wall = time.perf_counter() - start
    return {"wall_s": wall, "completed": len(latencies), "statuses": dict(statuses),
            "generated_tokens": int(sum(tokens)), "throughput_tok_s": sum(tokens) / wall,
            "requests_per_s": len(latencies) / wall, "ttft_s": percentiles(ttfts), "latency_s": percentiles(latencies),
            "inter_token_s": percentiles(itls), "decode_tok_s_per_request": percentiles(decode_rates)}


def hf_serial(cfg: BenchConfig, prompts: list[list[int]], tokenizer: Any) -> dict[str, Any]:
    """The same requests through plain `model.generate`, one after another (all arriving at t=0); for an
    ONNX export, through our ONNX Runtime engine at batch 1 (HF cannot run the export)."""
    import torch

    from runtime.engine import SamplingParams
    from runtime.loading import is_onnx_export, load_model

    onnx = is_onnx_export(cfg.artifact, cfg.device)
    if onnx:
        from runtime.onnx_backend import OnnxEngine

        engine = OnnxEngine(cfg.artifact)
        params = SamplingParams(max_new_tokens=cfg.max_tokens, stop_ids=(tokenizer.eos_token_id,))  # as HF stops
    else:
        model = load_model(cfg.artifact, cfg.device)
    service, finish, tokens = [], [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            t0 = time.perf_counter()
            if onnx:
                tokens += len(engine.generate([prompt], params)[0][0])
            else:
                out = model.generate(torch.tensor([prompt], device=cfg.device), max_new_tokens=cfg.max_tokens,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
                tokens += out.shape[1] - len(prompt)
            service.append(time.perf_counter() - t0)
            finish.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    return {"baseline": "serial ONNX engine" if onnx else "serial HF generate", "wall_s": wall,
            "generated_tokens": tokens, "throughput_tok_s": tokens / wall,
            "service_time_s": percentiles(service), "latency_if_all_arrive_at_once_s": percentiles(finish)}


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, argv, "python -m runtime.bench", __doc__.splitlines()[0])
    from runtime.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.artifact)
    prompts = make_prompts(tokenizer, cfg)
    proc = None
    url = cfg.url
    if url is None:
        proc, url = launch_server(cfg)
    try:
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        print(f"load test: {cfg.requests} requests, {cfg.concurrency} clients, prompts "
              f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {cfg.max_tokens} new tokens", flush=True)
        served = asyncio.run(load_test(url, model, prompts, cfg))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result: dict[str, Any] = {"config": asdict(cfg), "server": served,
                              "server_prefix_cache_hit_blocks": _metric(metrics, "shrinkwrap_prefix_cache_hit_blocks_total"),
                              "acceptance_rate": _metric(metrics, "shrinkwrap_speculative_acceptance_rate"),
                              "tokens_per_target_step": _metric(metrics, "shrinkwrap_speculative_tokens_per_target_step"),
                              "server_steps": {name: _by_kind(metrics, f"shrinkwrap_{name}_total")
                                               for name in ("steps", "step_tokens", "step_seconds", "step_host_seconds")}}
    if cfg.baseline:
        print("baseline: the same requests one at a time (HF generate; our ONNX engine for an export) ...", flush=True)
        result["hf_serial"] = hf_serial(cfg, prompts[:cfg.baseline_requests], tokenizer)
        result["throughput_ratio"] = served["throughput_tok_s"] / result["hf_serial"]["throughput_tok_s"]
    out = Path(cfg.out or f"artifacts/bench/serve-{cfg.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = served
    print(f"server: {s['completed']}/{cfg.requests} completed, statuses {s['statuses']}, "
          f"{s['throughput_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_s']['p50']:.3f} s p99 {s['ttft_s']['p99']:.3f} s, "
          f"latency p50 {s['latency_s']['p50']:.2f} s p99 {s['latency_s']['p99']:.2f} s, inter-token p50 "
          f"{1e3 * (s['inter_token_s']['p50'] or 0):.2f} ms p99 {1e3 * (s['inter_token_s']['p99'] or 0):.2f} ms, "
          f"decode per request p50 {s['decode_tok_s_per_request']['p50'] or 0:.1f} tok/s")
    steps = result["server_steps"]
    if steps["steps"]:
        print("server steps: " + ", ".join(
            f"{kind} {int(calls)} ({steps['step_tokens'][kind] / calls:.1f} tokens, "
            f"{1e3 * steps['step_seconds'][kind] / calls:.2f} ms of which host "
            f"{1e3 * steps['step_host_seconds'][kind] / calls:.2f} ms)" for kind, calls in steps["steps"].items()))
    if cfg.baseline:
        h = result["hf_serial"]
        print(f"{h['baseline']}: {h['throughput_tok_s']:.1f} tok/s, service p50 {h['service_time_s']['p50']:.2f} s, "
              f"latency (all at t=0) p50 {h['latency_if_all_arrive_at_once_s']['p50']:.1f} s p99 "
              f"{h['latency_if_all_arrive_at_once_s']['p99']:.1f} s; throughput ratio {result['throughput_ratio']:.2f}x")
    print(f"wrote {out}")


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _by_kind(text: str, name: str) -> dict[str, float]:
    """A labelled counter's values by its `kind` label."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + '{kind="'):
            label, value = line[len(name) + 7:].split('"} ')
            out[label] = float(value)
    return out


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(cfg: BenchConfig) -> tuple[subprocess.Popen, str]:
    """`python -m runtime.serve` on a free loopback port; waits for /health."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "runtime.serve", "--artifact", cfg.artifact, "--port", str(port), "--device",
           cfg.device, "--max-running", str(cfg.max_running), "--max-batch-tokens", str(cfg.max_batch_tokens),
           "--max-queue", str(cfg.requests + 1)]
    if cfg.decode_steps is not None:
        cmd += ["--decode-steps", str(cfg.decode_steps)]
    if cfg.draft:
        cmd += ["--draft", cfg.draft, "--k", str(cfg.k)] + (["--force"] if cfg.force else [])
    if cfg.server_args:
        cmd += shlex.split(cfg.server_args)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise UserError("the server did not come up within 300 s")
        time.sleep(0.5)


if __name__ == "__main__":
    run_main(main)
