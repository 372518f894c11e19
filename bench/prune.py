"""Pruning benchmark (issue 4): unstructured 50% and 2:4 for magnitude / Wanda / SparseGPT, and
structured (one third of the layers plus 25% of MLP channels) before and after recovery.

    python bench/prune.py [--recover-steps 60] [--n-samples 64]

All artifacts are evaluated in one `compress.evaluate` run beside the reference (same held-out
tokens); speed is measured for the reference and the structured models (the unstructured ones are
dense tensors with zeros, so their PyTorch speed is the reference's). Writes artifacts/bench/prune.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="artifacts/reference")
    parser.add_argument("--work", default="artifacts/bench/prune")
    parser.add_argument("--n-samples", default="64")
    parser.add_argument("--recover-steps", default="60")
    parser.add_argument("--skip-unstructured", action="store_true")
    args = parser.parse_args()
    w = Path(args.work)
    ref = args.reference
    cal = ["--n-samples", args.n_samples, "--seq-len", "512", "--overwrite"]
    unstructured = []
    if not args.skip_unstructured:
        for method in ("magnitude", "wanda", "sparsegpt"):
            for name, target in ((f"{method}-50", ["--sparsity", "0.5"]), (f"{method}-2of4", ["--pattern", "2:4"])):
                run("-m", "compress.prune", "--artifact", ref, "--method", method, *target, "--out", str(w / name), *cal)
                unstructured.append(str(w / name))
    run("-m", "compress.prune", "--artifact", ref, "--method", "layers", "--target-layers", "20",
        "--out", str(w / "layers-20"), *cal)
    run("-m", "compress.prune", "--artifact", str(w / "layers-20"), "--method", "mlp", "--sparsity", "0.25",
        "--out", str(w / "structured"), *cal)
    run("-m", "compress.prune", "--artifact", str(w / "layers-20"), "--method", "mlp", "--sparsity", "0.25",
        "--out", str(w / "structured-recovered"), "--recover", "--max-steps", args.recover_steps,
        "--teacher", ref, "--recover-config", "configs/prune/recover-cpu.yaml", *cal)
    run("-m", "compress.evaluate", "--reference", ref, "--artifacts", *unstructured, "--out", str(w / "eval-acc"),
        "--no-speed")
    run("-m", "compress.evaluate", "--reference", ref, "--artifacts", ref, str(w / "structured"),
        str(w / "structured-recovered"), "--out", str(w / "eval-speed"))
    rows = []
    for report_dir in ("eval-acc", "eval-speed"):
        report = json.loads((w / report_dir / "report.json").read_text())
        for r in report["results"]:
            rows.append({k: r.get(k) for k in ("name", "parameters", "perplexity", "kl", "top1_agreement",
                                               "decode_tok_s_b1", "prefill_tok_s")})
    ref_row = next(r for r in rows if r["name"] == Path(ref).name)
    out = Path("artifacts/bench/prune.json")
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print("\n| artifact | params | ppl | KL | top-1 | decode b1 tok/s | × reference |\n|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{r['decode_tok_s_b1']:.1f}" if r.get("decode_tok_s_b1") else "–"
        ratio = f"{r['decode_tok_s_b1'] / ref_row['decode_tok_s_b1']:.2f}" if r.get("decode_tok_s_b1") else "–"
        print(f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['kl']:.3f} | "
              f"{r['top1_agreement']:.3f} | {speed} | {ratio} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
