"""GPU decode benchmark (issue 7): static cache + CUDA graphs against HF `generate`, and a profile.

    python bench/gpu_decode.py [--model artifacts/reference | --random-init] [--new-tokens 256]

bf16 on CUDA, greedy, 256 new tokens after a short prompt, at batch 1 and 32, interleaved per
repeat: HF `generate` (dynamic cache), HF `generate` with its static cache, our StaticLlama eager,
replayed from CUDA graphs, and with the step compiled by Inductor inside the graphs. With real
weights, checks our tokens against HF's greedy ones. Then profiles single decode steps (compiled,
outside the graph) to say where the time goes: kernels per step, GPU busy time, what is left.
Writes $OUT/gpu_decode.json (or artifacts/bench/gpu_decode.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.static_decode import StaticLlama  # noqa: E402


def smollm2_shaped(device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="artifact (default: random-init SmolLM2-135M shape)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=None, help="subset of engines to time (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs CUDA")
    device = "cuda"
    if args.model:
        from runtime.loading import load_model, load_tokenizer

        model = load_model(args.model, device, dtype=torch.bfloat16)
        tokenizer = load_tokenizer(args.model)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the history of Paris."}],
                                               add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    else:
        model, prompt = smollm2_shaped(device), list(range(100, 130))
    n = args.new_tokens
    static = StaticLlama(model, max_batch=max(args.batches), max_len=len(prompt) + n + 8, dtype=torch.bfloat16)
    compiled = StaticLlama(model, max_batch=max(args.batches), max_len=len(prompt) + n + 8, dtype=torch.bfloat16)
    compiled.compile()
    start = time.perf_counter()
    compiled.generate([prompt] * max(args.batches), 4)  # compiles, captures the largest bucket
    for b in args.batches:
        compiled.generate([prompt] * b, 4)
    compile_s = time.perf_counter() - start

    def hf(batch: int, static_cache: bool):
        ids = torch.tensor([prompt] * batch, device=device)
        extra = {"cache_implementation": "static"} if static_cache else {}
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0, **extra)

    engines = {"hf-generate": lambda b: hf(b, False), "hf-generate-static-cache": lambda b: hf(b, True),
               "ours-eager": lambda b: (lambda: static.generate([prompt] * b, n, use_graph=False)),
               "ours-cuda-graph": lambda b: (lambda: static.generate([prompt] * b, n, use_graph=True)),
               "ours-cuda-graph+compile": lambda b: (lambda: compiled.generate([prompt] * b, n, use_graph=True))}
    if args.engines:
        engines = {name: make for name, make in engines.items() if name in args.engines}
    rows = []
    for batch in args.batches:
        runs = {name: make(batch) for name, make in engines.items()}
        for run in runs.values():
            run()  # warm-up (graph capture, HF static-cache compile)
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = min(best[name], timed(run))
        for name, seconds in best.items():
            rows.append({"engine": name, "batch": batch, "tok_s": batch * n / seconds, "seconds": seconds})
            print(f"batch {batch:>2} {name:<26} {batch * n / seconds:>10.0f} tok/s", flush=True)
    result = {"model": args.model or "random-init SmolLM2-135M shape", "prompt_tokens": len(prompt), "new_tokens": n,
              "dtype": "bfloat16", "compile_and_capture_s": compile_s, "rows": rows,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    eager_tokens = static.generate([prompt], 64, use_graph=False)[0]  # the compiled graphs against eager
    graph_tokens = compiled.generate([prompt], 64)[0]
    result["compiled_graph_equals_eager_tokens"] = next(
        (i for i, (a, b) in enumerate(zip(eager_tokens, graph_tokens, strict=True)) if a != b), 64)
    print(f"compiled+graph greedy equals our eager for the first {result['compiled_graph_equals_eager_tokens']} "
          "of 64 tokens (bf16)")
    if args.model:  # correctness: our greedy tokens against HF's
        ids = torch.tensor([prompt], device=device)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        ours = compiled.generate([prompt], 64)[0]
        agree = next((i for i, (a, b) in enumerate(zip(ref, ours, strict=True)) if a != b), 64)
        result["greedy_prefix_equal_to_hf"] = agree
        print(f"compiled+graph greedy equals HF for the first {agree} of 64 tokens (bf16)")

    # where the time goes: one compiled step, outside the graph, under the profiler
    from torch.profiler import ProfilerActivity, profile

    compiled.generate([prompt], 8, use_graph=False)
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            compiled.step_fn(1)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) / steps
    graph_step_us = 1e6 / next((r["tok_s"] for r in rows if r["engine"] == "ours-cuda-graph+compile"
                                and r["batch"] == 1), float("nan"))
    top = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    result["profile"] = {"kernels_per_step": len(kernels) / steps, "gpu_busy_us_per_step": busy_us,
                         "graph_step_us": graph_step_us, "idle_fraction": 1 - busy_us / graph_step_us,
                         "weight_bytes": sum(p.numel() * 2 for p in model.parameters())}
    print(top)
    print(json.dumps(result["profile"], indent=2))
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_decode_profile.txt").write_text(top)


if __name__ == "__main__":
    main()
