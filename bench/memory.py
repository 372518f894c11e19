"""Peak memory of GPTQ on a model of Qwen2.5-1.5B's shape (random weights, bf16 on disk), against its size.

Usage: python bench/memory.py [--layers N] [--samples 8] [--seq-len 256] [--keep]
Builds the model once under artifacts/bench/memory/ (reused), runs `python -m compress.quantize` in a
child process and reads the child's peak RSS (getrusage), and writes artifacts/bench/memory.json
with the model size on disk, the stated bound (disk + the output checkpoint, held while it is written,
+ one working layer + 1 GB of runtime) and the projection for an 8B model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def per_layer_bound(hidden: int, inter: int, heads: int, kv: int, head: int, tokens: int) -> dict[str, int]:
    """Bytes one working layer adds above the model at rest (fp32 copy, one group's Hessians, activations)."""
    q, kvd = heads * head, kv * head
    layer_params = hidden * (q + 2 * kvd) + q * hidden + 3 * hidden * inter
    return {"layer_fp32": 4 * layer_params,
            "hessian": 4 * max(3 * hidden * hidden, inter * inter),  # the widest group's (down_proj: inter^2)
            "gptq_work": 4 * 2 * inter * inter,  # two K x K matrices beside it (damped/factor/inverse)
            "activations": 2 * 4 * tokens * hidden,  # the current layer's inputs and outputs, fp32
            "linear_inputs": 4 * tokens * inter}  # one Linear's input in fp32 while its statistics are taken


def build(path: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import make_tiny_tokenizer, save_reference

    config = AutoConfig.for_model("qwen2", **{**QWEN25_15B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    save_reference(path, model, make_tiny_tokenizer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    work = ROOT / "artifacts" / "bench" / "memory"
    source = work / f"qwen2.5-1.5b-shape-{args.layers}l"
    if not (source / "shrinkwrap.json").is_file():
        print(f"building {source} (random weights, bf16) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--build-only", str(source), str(args.layers)], check=True)
    disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    out = work / "gptq-out"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compress.quantize", "--artifact", str(source), "--out", str(out),
                    "--method", "gptq", "--group-size", "128", "--n-samples", str(args.samples), "--seq-len",
                    str(args.seq_len), "--batch-size", "4", "--overwrite"], check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    c = QWEN25_15B
    head = c["hidden_size"] // c["num_attention_heads"]
    bound = per_layer_bound(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                            c["num_key_value_heads"], head, args.samples * args.seq_len)
    runtime_overhead = 1_000_000_000  # python + torch + transformers + tokenizer, measured ~0.6-0.9 GB
    e = LLAMA3_8B
    bound_8b = per_layer_bound(e["hidden_size"], e["intermediate_size"], e["heads"], e["kv_heads"], 128,
                               args.samples * args.seq_len)
    params_8b = 8.03e9
    output = sum(f.stat().st_size for f in out.glob("*.safetensors"))  # held whole while it is written
    result = {"model": f"Qwen2.5-1.5B shape, {args.layers} layers, random bf16", "disk_bytes": disk,
              "peak_rss_bytes": peak, "peak_over_disk_bytes": peak - disk, "per_layer_bound": bound,
              "output_bytes": output,
              "stated_bound_bytes": disk + output + sum(bound.values()) + runtime_overhead,
              "seconds": round(seconds, 1),
              "calibration_tokens": args.samples * args.seq_len,
              "projection_8b_bytes": int(2 * params_8b + 0.7 * params_8b + sum(bound_8b.values())
                                         + runtime_overhead),  # bf16 at rest + the output (4-bit linears, fp16 embedding and head: ~0.7 B/param) + a layer
              "projection_8b_per_layer": bound_8b, "machine": "2-core CPU VM, 24 GiB",
              "command": "python bench/memory.py " + " ".join(sys.argv[1:])}
    result["within_bound"] = peak <= result["stated_bound_bytes"]
    (ROOT / "artifacts" / "bench").mkdir(parents=True, exist_ok=True)
    (ROOT / "artifacts" / "bench" / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    gb = 1e9
    print(f"disk {disk / gb:.2f} GB, peak RSS {peak / gb:.2f} GB (over disk {(peak - disk) / gb:.2f} GB), "
          f"stated bound {result['stated_bound_bytes'] / gb:.2f} GB, within: {result['within_bound']}, "
          f"{seconds:.0f} s; 8B projection {result['projection_8b_bytes'] / gb:.1f} GB")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build-only":
        build(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
