"""The static decoder's speculative verify pass over k + 1 rows against one decode step, per kernel choice.

    python bench/verify_pass.py --like artifacts/gpu_like --k 1 2 3 4

Random weights of the model's shape (`--like`: a folder with its config.json; speed does not depend on the
weights' values), bf16, fused kernels, a 100-token context in the cache. For each choice of the kernels that
take the verify pass's 2..8 rows (`runtime/triton_decode.py` TILES["small"]: "gemv" reduces the rows one
after another, "gemv-rows" all together with the TILES["gemv_rows"] candidates below, "gemm" the tl.dot
tile), times the verify pass alone (a CUDA graph of it, with the features an EAGLE head reads) for each k,
interleaved over --repeats rounds; the decode step is timed in the same rounds (a 128-token greedy run).
Writes artifacts/bench/verify-pass.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from static_speculative import verify_ms  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from runtime import triton_decode  # noqa: E402
from runtime.static_decode import StaticDecoder  # noqa: E402

# name -> (TILES["small"], TILES["gemv_rows"] for 2, 4 and 8 padded rows: (columns per program for N <= 4096,
# warps, columns for larger N, warps)). "rows-chosen" is runtime/triton_decode.py's default, picked from the
# others' sweep ("rows-A/B-C/D": A, B, C, D at every row count; "-split": A and C divided by the row count).
CHOICES = {
    "gemv": ("gemv", None),
    "gemm": ("gemm", None),
    "rows-chosen": ("gemv-rows", {2: (2, 1, 16, 4), 4: (2, 4, 16, 8), 8: (2, 4, 8, 8)}),
    "rows-8/4-64/8-split": ("gemv-rows", {2: (4, 4, 32, 8), 4: (2, 4, 16, 8), 8: (1, 4, 8, 8)}),
    "rows-8/4-64/8": ("gemv-rows", dict.fromkeys((2, 4, 8), (8, 4, 64, 8))),
    "rows-4/4-32/8": ("gemv-rows", dict.fromkeys((2, 4, 8), (4, 4, 32, 8))),
    "rows-4/2-16/4": ("gemv-rows", dict.fromkeys((2, 4, 8), (4, 2, 16, 4))),
    "rows-2/1-16/4": ("gemv-rows", dict.fromkeys((2, 4, 8), (2, 1, 16, 4))),
    "rows-16/4-64/8-split": ("gemv-rows", {2: (8, 4, 32, 8), 4: (4, 4, 16, 8), 8: (2, 4, 8, 8)}),
    "rows-8/8-64/8": ("gemv-rows", dict.fromkeys((2, 4, 8), (8, 8, 64, 8))),
}


def choose(name: str) -> None:
    small, rows = CHOICES[name]
    triton_decode.TILES["small"] = (small,)
    if rows is not None:
        triton_decode.TILES["gemv_rows"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", default="artifacts/gpu_like", help="folder with the model's config.json")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/verify_pass.py times CUDA graphs: it needs a CUDA device")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.like)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to("cuda").eval()
    target = StaticDecoder(model, max_batch=1, max_len=512)
    target.use_fused_kernels()
    prompt = torch.randint(0, config.vocab_size, (100,)).tolist()
    times: dict[str, list[float]] = {"step": []}
    for _ in range(args.repeats):
        target.generate([prompt], 128)
        times["step"].append(1000 * target.timings[1] / 127)
        for name in args.choices:
            choose(name)
            for k in args.k:
                target.prefill([prompt], 16)  # a 100-token context; the verify pass does not move it
                times.setdefault(f"{name}_k{k}", []).append(verify_ms(target, k))
    step = statistics.median(times["step"])
    summary = {key: statistics.median(v) for key, v in times.items()}
    print(f"decode step: {step:.3f} ms (median of {args.repeats})")
    print(f"{'kernels':>24} " + " ".join(f"{f'k={k} ms':>9} {'x step':>6}" for k in args.k))
    for name in args.choices:
        print(f"{name:>24} " + " ".join(f"{summary[f'{name}_k{k}']:>9.3f} {summary[f'{name}_k{k}'] / step:>6.2f}"
                                        for k in args.k))
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "verify-pass.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "like": args.like, "k": args.k,
                                "choices": {n: str(CHOICES[n]) for n in args.choices}, "times_ms": times,
                                "median_ms": summary}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
