"""The serving core under concurrent clients, without HTTP: the scheduler over the paged engine.

Usage: python bench/scheduler_load.py [--device cuda] [--clients 64] [--requests 512] [--baseline-requests 128]
Random weights of SmolLM2-135M's shape, bf16 on CUDA. Clients keep `clients` greedy requests in flight
(prompts 64-192 tokens, 128 new tokens), as runtime.bench does over HTTP. Runs: the engine's batched
decode through the fused layer kernels (CUDA graphs; steps with prompt chunks as token rows of the decode
kernels), the same with those steps as one padded attention batch (the previous step), the same through the HF modules, the fused one
with sampled requests (temperature, top-p, seeds: the batch sampler), and, for the ratio, the
per-sequence decode they replace (fewer requests: it is slow), then the static decoder's pure decode at batch `clients` on the same
token counts (the engine underneath, the ceiling the server is measured against). Writes
artifacts/bench/scheduler_load.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.paged_decode import SMOLLM2  # noqa: E402
from runtime.engine import Engine, SamplingParams  # noqa: E402
from runtime.scheduler import Request, Scheduler  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def load(model: torch.nn.Module, prompts: list[list[int]], clients: int, new_tokens: int, mode: str,
         params: SamplingParams | None = None, decode_steps: int = 1, chunks_together: bool = True,
         token_rows: bool = True, draft=None, k: int = 2,
         profile=None, drafting_together: bool = True) -> dict:
    """mode: per_sequence (the old path), batched (HF modules' step), fused (the fused layer kernels' step).
    chunks_together: the prompt chunks of a step attend as one padded batch (False: one call per sequence);
    token_rows: steps with prompt chunks run as token rows of the decode kernels (fused; False: padded
    batch); draft: an EAGLE head (or draft engine) proposing up to `k` tokens (drafting_together: a head's greedy
    proposals for all sequences in one pass per token; False: per sequence). The engine is warmed up as the
    server does (graphs captured) before the clock starts. profile: a cProfile.Profile that records the
    scheduler thread's steps."""
    engine = Engine(model, block_size=16, num_blocks=clients * (192 + new_tokens + 16) // 16 + 64)
    batched = mode != "per_sequence"
    engine.runner.batched_decode = batched
    engine.runner.flat_prefill = batched and chunks_together and engine.runner.flat_prefill  # baseline: per sequence
    engine.runner.use_fused = engine.runner.use_fused and mode == "fused"
    engine.runner.token_rows = engine.runner.token_rows and token_rows and chunks_together
    engine.runner.warm_up(clients, 4096)
    scheduler = Scheduler(engine, max_context=512, max_running=clients, max_queue=len(prompts) + 1,
                          max_batch_tokens=4096, decode_steps=decode_steps, draft=draft, k=k)
    scheduler.batched_drafting = drafting_together
    if profile is not None:
        step = scheduler.step
        scheduler.step = lambda: profile.runcall(step)
    slots = threading.Semaphore(clients)
    done = threading.Event()
    finished: list[Request] = []
    token_times: dict[int, list[float]] = {}
    submitted: dict[int, float] = {}
    lock = threading.Lock()

    def on_event(request: Request, event) -> None:
        if event.kind == "token":
            token_times.setdefault(id(request), []).append(time.monotonic())
        elif event.kind == "done":
            with lock:
                finished.append(request)
                if len(finished) == len(prompts):
                    done.set()
            slots.release()

    scheduler.start()
    started = time.monotonic()
    for prompt in prompts:
        slots.acquire()
        request = Request(prompt, params or SamplingParams(max_new_tokens=new_tokens))
        request.on_event = (lambda r: lambda event: on_event(r, event))(request)
        submitted[id(request)] = time.monotonic()
        scheduler.submit(request)
    done.wait()
    wall = time.monotonic() - started
    scheduler.stop()
    out_tokens = sum(len(r.outputs[0]) for r in finished)
    ttft = [token_times[id(r)][0] - submitted[id(r)] for r in finished]
    tpot = [(token_times[id(r)][-1] - token_times[id(r)][0]) / (len(token_times[id(r)]) - 1) for r in finished
            if len(token_times[id(r)]) > 1]  # time per output token after the first (bursts averaged out)
    itl = [b - a for r in finished for a, b in zip(token_times[id(r)], token_times[id(r)][1:], strict=False)]
    stats = scheduler.stats
    return {"mode": mode, "draft": draft is not None, "acceptance": round(stats.acceptance_rate, 3),
            "draft_ms_per_call": round(1e3 * stats.draft_seconds / stats.draft_calls, 3) if stats.draft_calls else None,
            "fused_step": engine.runner.use_fused, "chunks_together": engine.runner.flat_prefill,
            "token_rows": engine.runner.use_fused and engine.runner.token_rows,
            "decode_steps": decode_steps, "requests": len(prompts), "output_tokens": out_tokens, "seconds": round(wall, 2),
            "output_tok_s": round(out_tokens / wall, 1), "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 1), "itl_p50_ms": round(1e3 * statistics.median(itl), 2),
            "itl_p99_ms": round(1e3 * percentile(itl, 99), 2), "tpot_p50_ms": round(1e3 * statistics.median(tpot), 2),
            "tpot_p99_ms": round(1e3 * percentile(tpot, 99), 2),
            "steps": {kind: {"calls": c, "tokens_per_call": round(t / c, 1), "ms_per_call": round(1e3 * sec / c, 3),
                             "host_ms_per_call": round(1e3 * host / c, 3)}
                      for kind, (c, t, sec, host) in scheduler.stats.step_kinds.items()}}


def static_decode(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> dict:
    from runtime.static_decode import StaticDecoder

    static = StaticDecoder.fastest(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + new_tokens + 8)
    static.generate(prompts, 4)  # compile and capture
    static.generate(prompts, new_tokens)
    decode_s = static.timings[1]
    return {"batch": len(prompts), "tok_s": round(len(prompts) * (new_tokens - 1) / decode_s, 1)}


RUNS = ("batched", "padded_chunks", "chunks_per_sequence", "single_step", "modules_step", "sampled", "per_sequence", "static_decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--baseline-requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--decode-steps", type=int, default=8, help="greedy steps per device call (the server's "
                        "default on CUDA)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="which runs (default: all)")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers})).to(args.device, dtype)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, SMOLLM2["vocab_size"], (int(n),), generator=gen).tolist()
               for n in torch.randint(64, 193, (args.requests,), generator=gen)]
    sampled = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95, seed=1)
    for mode in ("fused", "batched"):  # warm-up: kernels, graphs per bucket
        load(model, prompts[:args.clients * 2], args.clients, 24, mode, decode_steps=args.decode_steps)
    runs = {
        "batched": (f"fused step + graphs, {args.decode_steps} steps per device call",
                    lambda: load(model, prompts, args.clients, args.new_tokens, "fused", decode_steps=args.decode_steps)),
        "padded_chunks": ("the same, prompt chunks as one padded batch (the last session's step)",
                          lambda: load(model, prompts, args.clients, args.new_tokens, "fused",
                                       decode_steps=args.decode_steps, token_rows=False)),
        "chunks_per_sequence": (f"the same, {args.decode_steps} steps per call, prompt chunks attending per sequence",
                                lambda: load(model, prompts, args.clients, args.new_tokens, "fused",
                                             decode_steps=args.decode_steps, chunks_together=False)),
        "single_step": ("fused step + graphs, one step per call",
                        lambda: load(model, prompts, args.clients, args.new_tokens, "fused")),
        "modules_step": ("HF modules step + graphs", lambda: load(model, prompts, args.clients, args.new_tokens,
                                                                  "batched")),
        "sampled": ("fused, sampled (T 0.8, top-p 0.95, seeded)",
                    lambda: load(model, prompts, args.clients, args.new_tokens, "fused", sampled)),
        "per_sequence": ("per-sequence", lambda: load(model, prompts[:args.baseline_requests], args.clients,
                                                      args.new_tokens, "per_sequence")),
        "static_decode": ("static decoder pure decode",
                          lambda: static_decode(model, prompts[:args.clients], args.new_tokens)),
    }
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
              "clients": args.clients, "new_tokens": args.new_tokens,
              "command": "python bench/scheduler_load.py " + " ".join(sys.argv[1:])}
    for name in RUNS:
        if name in args.runs:
            title, run = runs[name]
            result[name] = run()
            print(f"{title}: {result[name]}", flush=True)
    if "batched" in result and "per_sequence" in result:
        result["ratio_vs_per_sequence"] = round(result["batched"]["output_tok_s"] / result["per_sequence"]["output_tok_s"], 2)
        print(f"batched / per-sequence x{result['ratio_vs_per_sequence']}")
    if "batched" in result and "static_decode" in result:
        result["share_of_static"] = round(result["batched"]["output_tok_s"] / result["static_decode"]["tok_s"], 3)
        print(f"share of the static decoder's pure decode {result['share_of_static']:.1%}")
    path = ROOT / "artifacts" / "bench" / "scheduler_load.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
