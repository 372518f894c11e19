"""Quantization benchmark: every variant of issue 5 beside the reference, in one run.

    python bench/quantize.py [--n-samples 128] [--seq-len 512] [--only NAME ...]

Quantizes the reference with each variant (wall time measured around the CLI), then evaluates all
of them in one `compress.evaluate` run (same held-out tokens; speed interleaved per artifact in
fresh processes) and writes artifacts/bench/quantize.json plus a table with the relative perplexity
increase over the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "rtn-w4g128-sym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym"],
    "rtn-w4g128-asym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--no-sym"],
    "gptq-w4g128-sym": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--no-desc-act"],
    "gptq-w4g128-asym": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--no-sym", "--no-desc-act"],
    "gptq-w4g128-sym-descact": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--desc-act"],
    "gptq-w4g128-asym-descact": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--no-sym", "--desc-act"],
    "gptq-w8g128-sym": ["--method", "gptq", "--bits", "8", "--group-size", "128", "--sym"],
    "dynamic-int8": ["--method", "dynamic-int8"],
    "bf16": ["--method", "bf16"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="artifacts/reference")
    parser.add_argument("--work", default="artifacts/bench/quantize")
    parser.add_argument("--n-samples", default="128")
    parser.add_argument("--seq-len", default="512")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--reuse", action="store_true", help="keep existing quantized artifacts")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--device", default="cpu", help="where quantization and evaluation run")
    args = parser.parse_args()
    work = Path(args.work)
    names = args.only or list(VARIANTS)
    wall = {}
    for name in names:
        out = work / name
        if args.reuse and (out / "shrinkwrap.json").is_file():
            wall[name] = json.loads((out / "shrinkwrap.json").read_text())["quantization"]["wall_seconds"]
            continue
        cmd = [sys.executable, "-m", "compress.quantize", "--artifact", args.reference, "--out", str(out),
               "--overwrite", "--n-samples", args.n_samples, "--seq-len", args.seq_len, *VARIANTS[name]]
        if VARIANTS[name][1] == "gptq":
            cmd += ["--device", args.device]
        print("+", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall[name] = round(time.perf_counter() - start, 1)
    eval_dir = work / "eval"
    cmd = [sys.executable, "-m", "compress.evaluate", "--reference", args.reference, "--artifacts", args.reference,
           *[str(work / n) for n in names], "--out", str(eval_dir), "--device", args.device]
    cmd += ["--no-speed"] if args.no_speed else []
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    report = json.loads((eval_dir / "report.json").read_text())
    ref = next(r for r in report["results"] if r["kind"] == "reference")
    rows = []
    for r in report["results"]:
        row = {k: r.get(k) for k in ("name", "perplexity", "kl", "top1_agreement", "size_mb", "decode_tok_s_b1",
                                     "prefill_tok_s")}
        row["ppl_increase_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
        row["decode_vs_fp32"] = (r["decode_tok_s_b1"] / ref["decode_tok_s_b1"]) if r.get("decode_tok_s_b1") else None
        manifest = work / r["name"] / "shrinkwrap.json"
        if r["kind"] == "quantized" and manifest.is_file():
            row["quantize_inner_s"] = json.loads(manifest.read_text())["quantization"]["wall_seconds"]
        row["quantize_wall_s"] = wall.get(r["name"])
        rows.append(row)
    out = Path(os.environ.get("OUT", "artifacts/bench")) / f"quantize-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "n_samples": args.n_samples, "seq_len": args.seq_len,
                               "protocol": report["protocol"], "machine": report["machine"], "rows": rows},
                              indent=2) + "\n")
    print("\n| variant | ppl | Δppl | KL | top-1 | size MB | decode b1 tok/s | × fp32 | CLI s | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dec = f"{r['decode_tok_s_b1']:.1f}" if r["decode_tok_s_b1"] else "–"
        ratio = f"{r['decode_vs_fp32']:.2f}" if r["decode_vs_fp32"] else "–"
        print(f"| {r['name']} | {r['perplexity']:.2f} | {r['ppl_increase_pct']:+.1f}% | {r['kl']:.4f} | "
              f"{r['top1_agreement']:.3f} | {r['size_mb']:.0f} | {dec} | {ratio} | {r['quantize_wall_s'] or '–'} | "
              f"{r.get('quantize_inner_s') or '–'} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
