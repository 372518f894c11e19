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
    client_processes: int | None = field(None, help="client processes sharing the load (default: 4 on CUDA, where "
                                         "one Python client is slower than the server; else 1)")
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
    static_baseline: bool = field(False, help="also decode the same prompts one at a time with our static decoder "
                                  "(runtime.generate --static): the server's per-request decode rate against it")
    baseline_requests: int | None = field(None, help="run the serial baseline on the first N requests only "
                                          "(it is slow; throughput does not depend on the count)")
    out: str | None = field(None, help="JSON output (default artifacts/bench/serve-<device>.json)")
    seed: int = field(0, help="seed for the prompt mix")

    def validate(self) -> None:
        if not self.artifact:
            raise UserError("artifact: required (the baseline and the tokenizer come from it)")
        if self.client_processes is None:
            self.client_processes = 4 if self.device.startswith("cuda") else 1
        if min(self.concurrency, self.requests, self.prompt_len, self.max_tokens, self.client_processes) < 1:
            raise UserError("concurrency, requests, prompt_len, max_tokens and client_processes must be positive")
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


async def _load_slice(url: str, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                      time_limit_s: float) -> dict[str, Any]:
    """One client process's share of the load: `concurrency` streams at a time; raw samples (merged by
    `load_test`), its wall-clock span and the CPU seconds it spent."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    raw: dict[str, Any] = {"statuses": Counter(), "ttft": [], "latency": [], "tokens": [], "itl": [], "decode": []}

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> None:
        async with gate:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            start = time.perf_counter()
            first = None
            arrivals: list[float] = []
            try:
                async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    raw["statuses"][str(response.status_code)] += 1
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
                            raw["tokens"].append(chunk["usage"]["completion_tokens"])
                raw["latency"].append(time.perf_counter() - start)
                raw["ttft"].append(first if first is not None else raw["latency"][-1])
                raw["itl"].extend(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
                if len(arrivals) > 1 and raw["tokens"]:  # this request's decode rate after its first token
                    raw["decode"].append((raw["tokens"][-1] - 1) / (arrivals[-1] - arrivals[0]))
            except httpx.HTTPError as exc:
                raw["statuses"][type(exc).__name__] += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    cpu = time.process_time()
    async with httpx.AsyncClient(timeout=httpx.Timeout(time_limit_s), limits=limits) as client:
        raw["start"] = time.time()
        tasks = [asyncio.create_task(one(client, p)) for p in prompts]
        done, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
            raw["statuses"]["unfinished"] += 1
        raw["end"] = time.time()
    raw["cpu_s"] = time.process_time() - cpu
    return raw


def _slice_main(args: tuple) -> dict[str, Any]:
    return asyncio.run(_load_slice(*args))


def load_test(url: str, model: str, prompts: list[list[int]], cfg: BenchConfig) -> dict[str, Any]:
    """The load from `cfg.client_processes` client processes (one: this one), `cfg.concurrency` streams in
    all: one Python client parses some ten thousand SSE chunks a second, which a GPU server outruns."""
    n = min(cfg.client_processes, cfg.concurrency)
    shares = [cfg.concurrency // n + (i < cfg.concurrency % n) for i in range(n)]
    jobs = [(url, model, prompts[i::n], shares[i], cfg.max_tokens, cfg.time_limit_s) for i in range(n)]
    if n == 1:
        slices = [_slice_main(jobs[0])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            slices = list(pool.map(_slice_main, jobs))
    wall = max(r["end"] for r in slices) - min(r["start"] for r in slices)
    merged = {key: [v for r in slices for v in r[key]] for key in ("ttft", "latency", "tokens", "itl", "decode")}
    statuses = sum((r["statuses"] for r in slices), Counter())
    return {"wall_s": wall, "completed": len(merged["latency"]), "statuses": dict(statuses),
            "generated_tokens": int(sum(merged["tokens"])), "throughput_tok_s": sum(merged["tokens"]) / wall,
            "requests_per_s": len(merged["latency"]) / wall, "ttft_s": percentiles(merged["ttft"]),
            "latency_s": percentiles(merged["latency"]), "inter_token_s": percentiles(merged["itl"]),
            "decode_tok_s_per_request": percentiles(merged["decode"]), "client_processes": n,
            "client_cpu_share": sum(r["cpu_s"] for r in slices) / (n * wall)}


def _cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process and of each of its children, by name."""
    import psutil

    proc = psutil.Process(pid)
    out = {"server": sum(proc.cpu_times()[:2])}
    for child in proc.children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            name = ("resource tracker" if "resource_tracker" in cmd else
                    child.environ().get("SHRINKWRAP_ROLE", "spawned process") if "spawn_main" in cmd else child.name())
            out[name] = out.get(name, 0.0) + sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return out


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


def static_serial(cfg: BenchConfig, prompts: list[list[int]]) -> dict[str, Any]:
    """The same prompts through `StaticDecoder` at batch 1 (fused kernels + CUDA graph on CUDA, as
    `runtime.generate --static`), greedy, `max_tokens` each: decode tok/s per request after the first token."""
    import torch

    from runtime.loading import load_model
    from runtime.static_decode import StaticDecoder

    cuda = cfg.device.startswith("cuda")
    model = load_model(cfg.artifact, cfg.device, dtype=torch.bfloat16 if cuda else None)
    static = StaticDecoder.fastest(model, max_batch=1, max_len=max(map(len, prompts)) + cfg.max_tokens + 1)
    static.generate([prompts[0]], 2)  # compile the kernels and capture the graph outside the timing
    rates = []
    for prompt in prompts:
        static.generate([prompt], cfg.max_tokens)
        rates.append((cfg.max_tokens - 1) / static.timings[1])
    return {"baseline": "static decoder, batch 1", "decode_tok_s_per_request": percentiles(rates)}


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
        before = _cpu_seconds(proc.pid) if proc is not None else {}
        served = load_test(url, model, prompts, cfg)
        after = _cpu_seconds(proc.pid) if proc is not None else {}
        served["server_cpu_share"] = {name: (after[name] - before.get(name, 0.0)) / served["wall_s"] for name in after}
        metrics = _samples(httpx.get(f"{url}/metrics", timeout=10).text)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result: dict[str, Any] = {"config": asdict(cfg), "server": served,
                              "server_prefix_cache_hit_blocks": _metric(metrics, "shrinkwrap_prefix_cache_hit_blocks_total"),
                              "acceptance_rate": _metric(metrics, "shrinkwrap_speculative_acceptance_rate"),
                              "tokens_per_target_step": _metric(metrics, "shrinkwrap_speculative_tokens_per_target_step"),
                              "draft_calls": _metric(metrics, "shrinkwrap_draft_calls_total"),
                              "draft_seconds": _metric(metrics, "shrinkwrap_draft_seconds_total"),
                              "server_steps": {name: _by_kind(metrics, f"shrinkwrap_{name}_total")
                                               for name in ("steps", "step_tokens", "step_seconds", "step_host_seconds")}}
    if cfg.baseline:
        print("baseline: the same requests one at a time (HF generate; our ONNX engine for an export) ...", flush=True)
        result["hf_serial"] = hf_serial(cfg, prompts[:cfg.baseline_requests], tokenizer)
        result["throughput_ratio"] = served["throughput_tok_s"] / result["hf_serial"]["throughput_tok_s"]
    if cfg.static_baseline:
        print("static baseline: the same prompts one at a time through our static decoder ...", flush=True)
        result["static_serial"] = static_serial(cfg, prompts)
        result["decode_share_of_static"] = (served["decode_tok_s_per_request"]["p50"] or 0) / result[
            "static_serial"]["decode_tok_s_per_request"]["p50"]
    out = Path(cfg.out or f"artifacts/bench/serve-{cfg.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = served
    print(f"server: {s['completed']}/{cfg.requests} completed, statuses {s['statuses']}, "
          f"{s['throughput_tok_s']:.1f} tok/s, TTFT p50 {s['ttft_s']['p50']:.3f} s p99 {s['ttft_s']['p99']:.3f} s, "
          f"latency p50 {s['latency_s']['p50']:.2f} s p99 {s['latency_s']['p99']:.2f} s, inter-token p50 "
          f"{1e3 * (s['inter_token_s']['p50'] or 0):.2f} ms p99 {1e3 * (s['inter_token_s']['p99'] or 0):.2f} ms, "
          f"decode per request p50 {s['decode_tok_s_per_request']['p50'] or 0:.1f} tok/s")
    print(f"CPU busy (share of the wall time): {s['client_processes']} client process(es) "
          f"{s['client_cpu_share']:.0%} each, " + ", ".join(f"{name} {share:.0%}"
                                                        for name, share in s.get("server_cpu_share", {}).items()))
    if s["client_cpu_share"] > 0.9:
        print(f"note: the load generator was busy {s['client_cpu_share']:.0%} of the time: the figures may be its "
              "limit, not the server's (raise --client-processes)")
    steps = result["server_steps"]
    if steps["steps"]:
        print("server steps: " + ", ".join(
            f"{kind} {int(calls)} ({steps['step_tokens'][kind] / calls:.1f} tokens, "
            f"{1e3 * steps['step_seconds'][kind] / calls:.2f} ms of which host "
            f"{1e3 * steps['step_host_seconds'][kind] / calls:.2f} ms)" for kind, calls in steps["steps"].items()))
    if result["draft_calls"]:
        print(f"drafting before the steps: {int(result['draft_calls'])} calls, "
              f"{1e3 * result['draft_seconds'] / result['draft_calls']:.2f} ms each")
    if cfg.static_baseline:
        print(f"static decoder at batch 1, same prompts: decode per request p50 "
              f"{result['static_serial']['decode_tok_s_per_request']['p50']:.1f} tok/s; the server's share "
              f"{result['decode_share_of_static']:.1%}")
    if cfg.baseline:
        h = result["hf_serial"]
        print(f"{h['baseline']}: {h['throughput_tok_s']:.1f} tok/s, service p50 {h['service_time_s']['p50']:.2f} s, "
              f"latency (all at t=0) p50 {h['latency_if_all_arrive_at_once_s']['p50']:.1f} s p99 "
              f"{h['latency_if_all_arrive_at_once_s']['p99']:.1f} s; throughput ratio {result['throughput_ratio']:.2f}x")
    print(f"wrote {out}")


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The server's /metrics text as sample name -> (labels, value) pairs (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _metric(samples: dict, name: str) -> float | None:
    """An unlabelled sample's value (None: the server does not export it)."""
    return next((value for labels, value in samples.get(name, []) if not labels), None)


def _by_kind(samples: dict, name: str) -> dict[str, float]:
    """A labelled counter's values by its `kind` label."""
    return {labels["kind"]: value for labels, value in samples.get(name, []) if "kind" in labels}


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(cfg: BenchConfig) -> tuple[subprocess.Popen, str]:
    """`python -m runtime.serve` on a free loopback port; waits for /health."""
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
    wait_until_healthy(proc, url, 300)
    return proc, url


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Until the started server's /health answers 200; a server that exits or stays down is an error."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise UserError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise UserError(f"the server did not come up within {timeout_s:.0f} s")
        time.sleep(0.2)


if __name__ == "__main__":
    run_main(main)
