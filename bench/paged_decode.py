"""Decode steps of the paged engine, three ways: the per-sequence loop (the old path), the batched step
through the HF modules (paged-attention kernel, CUDA graphs), and the batched step through the fused
layer kernels (five Triton kernels per layer, CUDA graphs).

Usage: python bench/paged_decode.py [--device cuda] [--batches 1 8 64] [--steps 32] [--dtype bfloat16]
Random weights of SmolLM2-135M's shape (speed does not depend on the values). For each batch size:
prompts of 64-192 tokens are prefilled, then `steps` greedy decode steps are timed, the paths
interleaved three times (median reported), and their first-step logits compared with the per-sequence
path's. Writes artifacts/bench/paged_decode.json.
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

from runtime.kv_cache import Sequence  # noqa: E402
from runtime.paged_decoder import PagedDecoder  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
               rope_theta=100000.0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


MODES = ("per_sequence", "batched", "fused")


def run(runner: PagedDecoder, prompts: list[list[int]], steps: int, mode: str, device: str
        ) -> tuple[float, torch.Tensor]:
    """Seconds for `steps` decode steps of all prompts, and the first step's logits."""
    seqs = [Sequence(list(p)) for p in prompts]
    runner.batched_decode = True
    logits = runner.forward(seqs)
    for s, row in zip(seqs, logits, strict=True):
        s.tokens.append(int(row[-1].argmax()))
    flat, fused = runner.flat_prefill, runner.use_fused
    batched = mode != "per_sequence"
    runner.batched_decode, runner.flat_prefill = batched, batched and flat  # the baseline: all per sequence
    runner.use_fused = mode == "fused"
    sync(device)
    start = time.perf_counter()
    first = None
    for _ in range(steps):
        logits = runner.forward(seqs)
        if first is None:  # the first step's logits: the same inputs for both paths (later, greedy may diverge)
            first = torch.stack([row[-1] for row in logits]).float().cpu()
        nxt = torch.stack([row[-1] for row in logits]).argmax(-1).tolist()  # one host sync per step
        for s, t in zip(seqs, nxt, strict=True):
            s.tokens.append(t)
    sync(device)
    seconds = time.perf_counter() - start
    runner.batched_decode, runner.flat_prefill, runner.use_fused = True, flat, fused
    for s in seqs:
        runner.pool.free_sequence(s)
    return seconds, first


def profile(runner: PagedDecoder, batch: int, gen: torch.Generator, fused: bool) -> dict:
    """One decode step at `batch`: kernels of the eager step, and for the graph-replayed step the host time
    (building metadata, copying it, launching) against the GPU time of the replay."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prompts = [torch.randint(0, SMOLLM2["vocab_size"], (128,), generator=gen).tolist() for _ in range(batch)]
    seqs = [Sequence(list(p)) for p in prompts]
    runner.forward(seqs)
    for s in seqs:
        s.tokens.append(1)
    runner.use_fused, was_fused = fused, runner.use_fused
    runner.use_graphs, graphs = False, runner.use_graphs
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.forward(seqs)
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    runner.use_graphs = graphs
    host, total, gpu = [], [], []
    for _ in range(20):
        for s in seqs:
            s.tokens.append(1)
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start_event.record()
        runner.forward(seqs)
        end_event.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append(t1 - t0)
        total.append(time.perf_counter() - t0)
        gpu.append(start_event.elapsed_time(end_event) / 1e3)
    for s in seqs:
        runner.pool.free_sequence(s)
    runner.use_fused = was_fused
    row = {"profile_batch": batch, "step": "fused" if fused else "batched", "eager_kernels_per_step": kernels,
           "graph_step_ms": round(1e3 * statistics.median(total), 3),
           "host_ms": round(1e3 * statistics.median(host), 3), "gpu_ms": round(1e3 * statistics.median(gpu), 3)}
    row["gpu_busy"] = round(row["gpu_ms"] / row["graph_step_ms"], 3)
    print(f"profile ({row['step']}) at batch {batch}: {kernels} kernels per eager step; graph-replayed step {row['graph_step_ms']} ms "
          f"(host {row['host_ms']} ms, GPU {row['gpu_ms']} ms, busy {row['gpu_busy']:.0%})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers})).to(args.device, dtype)
    runner = PagedDecoder(model.eval(), block_size=16, num_blocks=max(args.batches) * (192 + args.steps + 32) // 16 + 64)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        lengths = torch.randint(64, 193, (batch,), generator=gen).tolist()
        prompts = [torch.randint(0, SMOLLM2["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
        modes = [m for m in MODES if m != "fused" or runner.fused is not None]
        for mode in modes:
            run(runner, prompts, 2, mode, args.device)  # warm-up: Triton compilation, graph capture, allocator
        times: dict[str, list[float]] = {m: [] for m in modes}
        last: dict[str, torch.Tensor] = {}
        for _ in range(3):
            for mode in modes:
                seconds, last[mode] = run(runner, prompts, args.steps, mode, args.device)
                times[mode].append(seconds)
        ref = last["per_sequence"]
        row = {"batch": batch}
        for mode in modes:
            row[f"{mode}_tok_s"] = round(batch * args.steps / statistics.median(times[mode]), 1)
            row[f"{mode}_logits_rel_diff"] = float((last[mode] - ref).norm() / ref.norm())
        row["ratio"] = round(row[f"{modes[-1]}_tok_s"] / row["per_sequence_tok_s"], 2)
        rows.append(row)
        print(f"batch {batch:3d}: " + ", ".join(f"{m} {row[m + '_tok_s']:9.1f} tok/s" for m in modes)
              + f"; x{row['ratio']:.2f}; first-step logits rel. diff "
              + ", ".join(f"{row[m + '_logits_rel_diff']:.1e}" for m in modes[1:]), flush=True)
    if args.device.startswith("cuda"):
        for fused in ([False, True] if runner.fused is not None else [False]):
            rows.append(profile(runner, batch=max(args.batches), gen=gen, fused=fused))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    out = {"device": device_name, "dtype": args.dtype, "layers": args.layers, "steps": args.steps, "rows": rows,
           "command": "python bench/paged_decode.py " + " ".join(sys.argv[1:])}
    path = ROOT / "artifacts" / "bench" / "paged_decode.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
