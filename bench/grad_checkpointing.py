"""Gradient checkpointing: peak memory and step time with and without, same batch and length.

    python bench/grad_checkpointing.py --teacher artifacts/reference [--device cpu|cuda] [--batch 4 --seq-len 512]

Each variant runs in a fresh process (peak RSS on the CPU, max_memory_allocated on CUDA): the
15-layer layer-drop student takes KD training steps under the frozen teacher, the same code path as
compress.distill. Writes artifacts/bench/grad_checkpointing-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one_variant(args: argparse.Namespace) -> dict:
    import torch

    from compress.distill import evenly_spaced_layers
    from compress.models import load_artifact_model
    from compress.surgery import keep_layers
    from train.distillation import DistillationModule, LossWeights, OptimConfig

    device = torch.device(args.device)
    torch.manual_seed(0)  # same token batch for both variants
    teacher = load_artifact_model(args.teacher)
    student = keep_layers(teacher, evenly_spaced_layers(teacher.config.num_hidden_layers, 15))
    module = DistillationModule(student, teacher, LossWeights(), OptimConfig(), args.checkpointing == "on")
    module.student.to(device).train()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module._teacher[0] = teacher.to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(module.student.parameters(), lr=1e-4)
    ids = torch.randint(0, teacher.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = module.losses(ids)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"checkpointing": args.checkpointing, "device": str(device), "batch": args.batch, "seq_len": args.seq_len,
              "step_s_median": statistics.median(times[1:] or times), "loss": float(loss)}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    from compress.speed import peak_rss_mb

    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="artifacts/reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpointing", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpointing:
        print(json.dumps(one_variant(args)))
        return
    rows = []
    for variant in ("off", "on"):
        cmd = [sys.executable, __file__, "--teacher", args.teacher, "--device", args.device, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--checkpointing", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    key = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    summary = {"memory_key": key, "memory_saving": 1 - rows[1][key] / rows[0][key],
               "step_time_cost": rows[1]["step_s_median"] / rows[0]["step_s_median"] - 1}
    out_dir = Path(os.environ.get("OUT", "artifacts/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"grad_checkpointing-{args.device.split(':')[0]}.json").write_text(
        json.dumps({"rows": rows, **summary}, indent=2))
    print(f"\n| checkpointing | {key} | step s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['checkpointing']} | {r[key]:.0f} | {r['step_s_median']:.3f} |")
    print(f"memory saving {summary['memory_saving']:.1%}, step-time cost {summary['step_time_cost']:+.1%}")


if __name__ == "__main__":
    main()
