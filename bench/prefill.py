"""The paged engine's prompt-chunk pass (the server's mixed steps), timed and profiled.

Usage: python bench/prefill.py [--device cuda] [--prompts 1 16 32] [--repeats 5]
Random weights of SmolLM2-135M's shape. For each prompt count: prompts of 64-192 tokens (one prompt: 128)
prefilled in one `PagedDecoder.forward` call, six ways interleaved (`repeats` rounds, median): the fused
layer kernels with every new token a row of the decode kernels (graph per token-count bucket), or the
fused kernels or the HF modules with the chunks attending as one padded batch or per sequence, and the fused
padded batch with SDPA's cuDNN backend allowed (each round one token longer: a new shape, as in a
server, where cuDNN builds a plan per shape; the other ways exclude that backend). Then a
profile of one token-rows call at the largest count: wall time, GPU kernel time, the ops that take the most
host and device time. Writes artifacts/bench/prefill.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.paged_decode import SMOLLM2, sync  # noqa: E402
from runtime.kv_cache import Sequence  # noqa: E402
from runtime.paged_decoder import PagedDecoder  # noqa: E402

WAYS = {"fused, token rows": (True, True, False, True), "fused, together": (True, True, False, False),
        "fused, per sequence": (True, False, False, False), "modules, together": (False, True, False, False),
        "modules, per sequence": (False, False, False, False), "fused, together, cuDNN allowed": (True, True, True, False)}


def prefill(runner: PagedDecoder, prompts: list[list[int]], fused: bool, together: bool, device: str,
            cudnn: bool = False, rows: bool = False) -> float:
    """Seconds for one forward over every prompt (fresh sequences; their blocks freed afterwards)."""
    runner.use_fused, runner.flat_prefill = fused and runner.fused is not None, together
    runner.token_rows = rows
    runner.cudnn_attention = cudnn
    seqs = [Sequence(list(p)) for p in prompts]
    sync(device)
    start = time.perf_counter()
    runner.forward(seqs)
    sync(device)
    elapsed = time.perf_counter() - start
    for s in seqs:
        runner.pool.free_sequence(s)
    return elapsed


def profile(runner: PagedDecoder, prompts: list[list[int]], device: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    prefill(runner, prompts, True, True, device, rows=True)
    with torch_profile(activities=activities) as prof:
        wall = prefill(runner, prompts, True, True, device, rows=True)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name != "CPU")
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    by_device = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return {"prompts": len(prompts), "wall_ms": round(1e3 * wall, 2), "device_kernel_ms": round(device_us / 1e3, 2),
            "top_host": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in by_host],
            "top_device": [(e.key, e.count, round(e.self_device_time_total / 1e3, 2)) for e in by_device]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers})).to(args.device, dtype)
    runner = PagedDecoder(model.eval(), block_size=16, num_blocks=max(args.prompts) * 16 + 64)
    if runner.fused is not None:
        runner.compile_fused_shapes()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for count in args.prompts:
        lengths = [128] if count == 1 else torch.randint(64, 193, (count,), generator=gen).tolist()
        prompts = [torch.randint(0, SMOLLM2["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        for fused, together, _, rows_way in WAYS.values():  # warm-up: kernels of these shapes, graphs
            prefill(runner, prompts, fused, together, args.device, rows=rows_way)
        for _ in range(args.repeats):
            for way, (fused, together, cudnn, rows_way) in WAYS.items():
                if cudnn:  # every round a new shape, as the server meets them
                    prompts = [p + p[:1] for p in prompts]
                times[way].append(prefill(runner, prompts, fused, together, args.device, cudnn, rows_way))
        row = {"prompts": count, "tokens": sum(lengths),
               **{way: round(1e3 * statistics.median(t), 2) for way, t in times.items()}}
        rows.append(row)
        print(f"{count} prompts, {row['tokens']} tokens: " + ", ".join(f"{way} {row[way]} ms" for way in WAYS),
              flush=True)
    counts = max(args.prompts)
    lengths = torch.randint(64, 193, (counts,), generator=gen).tolist()
    prof = profile(runner, [torch.randint(0, SMOLLM2["vocab_size"], (n,), generator=gen).tolist() for n in lengths],
                   args.device)
    print(f"profile, fused, token rows, {counts} prompts: wall {prof['wall_ms']} ms, GPU kernels {prof['device_kernel_ms']} ms")
    print("  most host time:  " + "; ".join(f"{k} x{c} {ms} ms" for k, c, ms in prof["top_host"]))
    print("  most GPU time:   " + "; ".join(f"{k[:60]} x{c} {ms} ms" for k, c, ms in prof["top_device"]))
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU", "rows": rows,
              "profile": prof, "command": "python bench/prefill.py " + " ".join(sys.argv[1:])}
    path = ROOT / "artifacts" / "bench" / "prefill.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
