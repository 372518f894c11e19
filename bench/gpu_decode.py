"""GPU decode benchmark (issue 7): static cache + CUDA graphs against HF `generate`, and a profile.

    python bench/gpu_decode.py [--model artifacts/reference | --random-init] [--new-tokens 256]

bf16 on CUDA, greedy, 256 new tokens after a short prompt, at batch 1 and 32, interleaved per
repeat: HF `generate` (dynamic cache), HF `generate` with its static cache, our StaticDecoder eager,
replayed from CUDA graphs, with the step compiled by Inductor inside the graphs, and with the fused
Triton step (runtime/triton_decode.py) inside the graphs. `--sweep` first tries the Triton tile
sizes and keeps the fastest. With real weights, checks our tokens against HF's greedy ones. Then
profiles single decode steps (outside the graph) to say where the time goes: kernels per step, GPU
busy time, what is left.
Writes $OUT/gpu_decode.json (or artifacts/bench/gpu_decode.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.static_decode import StaticDecoder  # noqa: E402


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
    parser.add_argument("--sweep", action="store_true", help="try Triton tile sizes first, keep the fastest")
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
    static = StaticDecoder(model, max_batch=max(args.batches), max_len=len(prompt) + n + 8, dtype=torch.bfloat16)
    compiled = StaticDecoder(model, max_batch=max(args.batches), max_len=len(prompt) + n + 8, dtype=torch.bfloat16)
    compiled.compile()
    fused = StaticDecoder(model, max_batch=max(args.batches), max_len=len(prompt) + n + 8, dtype=torch.bfloat16)
    fused.use_fused_kernels()
    sweep = tile_sweep(fused, prompt, args.batches) if args.sweep else []
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
               "ours-cuda-graph+compile": lambda b: (lambda: compiled.generate([prompt] * b, n, use_graph=True)),
               "ours-triton+cuda-graph": lambda b: (lambda: fused.generate([prompt] * b, n, use_graph=True))}
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
    from runtime import triton_decode

    result = {"model": args.model or "random-init SmolLM2-135M shape", "prompt_tokens": len(prompt), "new_tokens": n,
              "dtype": "bfloat16", "compile_and_capture_s": compile_s, "rows": rows, "sweep": sweep,
              "tiles": triton_decode.TILES,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    # greedy agreement on a batch of 8 copies of the prompt (rows must agree with each other too)
    eager_tokens = static.generate([prompt], 64, use_graph=False)[0]
    for name, engine in (("compiled", compiled), ("fused", fused)):
        graph_rows = engine.generate([prompt] * 8, 64)
        result[f"{name}_graph_equals_eager_tokens"] = min(first_difference(eager_tokens, r) for r in graph_rows)
        print(f"{name}+graph greedy equals our eager for the first {result[f'{name}_graph_equals_eager_tokens']} "
              "of 64 tokens (bf16, all 8 rows)")
    if args.model:  # correctness: our greedy tokens against HF's
        ids = torch.tensor([prompt], device=device)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                             do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        for name, engine in (("compiled", compiled), ("fused", fused)):
            agree = first_difference(ref, engine.generate([prompt], 64)[0])
            result[f"{name}_greedy_prefix_equal_to_hf"] = agree
            print(f"{name}+graph greedy equals HF for the first {agree} of 64 tokens (bf16)")

    result["profile"] = {}
    for name, engine, batch in (("ours-cuda-graph+compile", compiled, 1), ("ours-triton+cuda-graph", fused, 1),
                                ("ours-cuda-graph+compile", compiled, max(args.batches)),
                                ("ours-triton+cuda-graph", fused, max(args.batches))):
        summary, top = profile_step(engine, prompt, rows, name, batch)
        name = f"{name} batch {batch}"
        summary["weight_bytes"] = sum(p.numel() * 2 for p in model.parameters())
        result["profile"][name] = summary
        print(top)
        print(name, json.dumps(summary, indent=2))
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_decode_profile.txt").write_text(top)


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def profile_step(engine: StaticDecoder, prompt: list[int], rows: list[dict], name: str, batch: int
                 ) -> tuple[dict, str]:
    """Where the time goes: ten single steps outside the graph under the profiler, against the graph's step."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate([prompt] * batch, 8, use_graph=False)
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step_fn(batch)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) / steps
    graph_step_us = batch * 1e6 / next((r["tok_s"] for r in rows if r["engine"] == name and r["batch"] == batch),
                                       float("nan"))
    summary = {"kernels_per_step": len(kernels) / steps, "gpu_busy_us_per_step": busy_us,
               "graph_step_us": graph_step_us, "idle_fraction": 1 - busy_us / graph_step_us}
    return summary, prof.key_averages().table(sort_by="cuda_time_total", row_limit=8)


def tile_sweep(fused: StaticDecoder, prompt: list[int], batches: list[int], tokens: int = 128) -> list[dict]:
    """Coordinate search over the Triton tile sizes (GEMV and attention at batch 1, GEMM at the largest batch)."""
    from runtime import triton_decode

    candidates = {"pdl": [(True,), (False,)] if triton_decode.TILES["pdl"][0] else [(False,)],
                  "gemv": [(8, 8, 32, 8), (4, 4, 32, 8), (8, 4, 64, 8), (16, 8, 32, 8)],
                  "attention": [(128, 4), (64, 2)],
                  "gemm": [(16, 256, 4), (16, 128, 8), (32, 256, 4)]}
    rows = []
    for kind, options in candidates.items():
        batch = max(batches) if kind == "gemm" else 1
        best = (-1.0, options[-1])
        for tiles in options:
            triton_decode.TILES[kind] = tiles
            fused.graphs.clear()
            try:
                fused.generate([prompt] * batch, 8)  # compile + capture
            except Exception as error:  # a configuration this GPU/Triton cannot run: say so, go on
                print(f"sweep {kind:<9} {tiles}: failed: {str(error).splitlines()[0][:200]}", flush=True)
                continue
            run = functools.partial(fused.generate, [prompt] * batch, tokens)
            seconds = min(timed(run) for _ in range(2))
            rows.append({"kind": kind, "tiles": tiles, "batch": batch, "tok_s": batch * tokens / seconds})
            print(f"sweep {kind:<9} {tiles} batch {batch}: {batch * tokens / seconds:.0f} tok/s", flush=True)
            best = max(best, (batch * tokens / seconds, tiles))
        triton_decode.TILES[kind] = best[1]
    fused.graphs.clear()
    return rows


if __name__ == "__main__":
    main()
