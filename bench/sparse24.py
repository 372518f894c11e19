"""2:4 semi-structured sparse Linear vs dense on a GPU, for SmolLM2-135M's projection shapes.

    python bench/sparse24.py [--dtype float16] [--tokens 1 8 32 512 4096]

Times F.linear with a dense weight against the same weight pruned 2:4 and converted with
torch.sparse.to_sparse_semi_structured (CUTLASS / cuSPARSELt kernels), interleaved, CUDA events,
median of repeats; checks the sparse result against the dense product of the pruned weight.
Writes artifacts/bench/sparse24.json (or $OUT/sparse24.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
          "down_proj": (576, 1536)}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}


def prune_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.abs().topk(2, dim=2).indices, True)
    return (groups * keep).reshape_as(w)


def time_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    from torch.sparse import to_sparse_semi_structured

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for tokens in args.tokens:
        dense_total = sparse_total = 0.0
        for name, (out_f, in_f) in SHAPES.items():
            w = prune_24(torch.randn(out_f, in_f, device="cuda", dtype=dtype))
            x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
            row = {"tokens": tokens, "shape": name, "out": out_f, "in": in_f}
            try:
                ws = to_sparse_semi_structured(w)
                err = ((F.linear(x, ws) - F.linear(x, w)).float().norm() / F.linear(x, w).float().norm()).item()
                d = time_ms(lambda x=x, w=w: F.linear(x, w))
                s = time_ms(lambda x=x, ws=ws: F.linear(x, ws))
                row.update(dense_ms=d, sparse_ms=s, speedup=d / s, rel_err=err)
                dense_total += d * PER_LAYER[name]
                sparse_total += s * PER_LAYER[name]
            except (RuntimeError, NotImplementedError) as exc:
                row["error"] = str(exc).splitlines()[0][:200]
            rows.append(row)
            print(row, flush=True)
        if sparse_total:
            rows.append({"tokens": tokens, "shape": "one decoder layer (7 projections)", "dense_ms": dense_total,
                         "sparse_ms": sparse_total, "speedup": dense_total / sparse_total})
    out_dir = Path(os.environ.get("OUT", "artifacts/bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sparse24.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "dtype": args.dtype,
                                                       "torch": torch.__version__, "rows": rows}, indent=2))
    print("\n| tokens | shape | dense µs | 2:4 µs | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        if "speedup" in r:
            print(f"| {r['tokens']} | {r['shape']} | {1000 * r['dense_ms']:.1f} | {1000 * r['sparse_ms']:.1f} | "
                  f"{r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
