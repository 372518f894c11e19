"""TensorRT-LLM engine against our runtime (needs a GPU and tensorrt-llm==1.2.1; not runnable here).

    python bench/trtllm.py --artifact artifacts/reference --engine /tmp/trt/engine [--prompts 8] [--new-tokens 128]

Same chat prompts (held-out articles), greedy, bf16/fp16: the engine's tokens against our static
decoder's (how many prompts agree token for token, and where the first difference is), then decode
tokens/s at batch 1 and 32 for the engine and for our static decoder (fused Triton step in CUDA
graphs), interleaved per repeat. Writes $OUT/trtllm.json (or artifacts/bench/trtllm.json).
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

from core.data import chat_prompts  # noqa: E402
from runtime.engine import SamplingParams  # noqa: E402
from runtime.loading import load_model, load_tokenizer  # noqa: E402
from runtime.static_decode import StaticDecoder  # noqa: E402
from runtime.trtllm_backend import TrtllmEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True, help="the float artifact the engine was built from")
    parser.add_argument("--engine", required=True, help="engine directory (build.sh output)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs CUDA")
    tokenizer = load_tokenizer(args.artifact)
    texts = chat_prompts(tokenizer, max(args.prompts, 32))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    engine = TrtllmEngine(args.engine, max_batch_size=32)
    static = StaticDecoder(load_model(args.artifact, "cuda", dtype=torch.bfloat16), max_batch=32,
                         max_len=max(map(len, prompts)) + args.new_tokens + 8)
    static.use_fused_kernels()
    greedy = SamplingParams(max_new_tokens=args.new_tokens)
    theirs, _ = engine.generate(prompts[: args.prompts], greedy)
    ours = [static.generate([p], args.new_tokens)[0] for p in prompts[: args.prompts]]
    agree = []
    for a, b in zip(theirs, ours, strict=True):
        n = min(len(a), len(b))
        agree.append(next((i for i in range(n) if a[i] != b[i]), n))
    result = {"prompts": args.prompts, "identical": sum(a == b[: len(a)] for a, b in zip(theirs, ours, strict=True)),
              "first_difference": agree, "speed": {}}
    for batch in (1, 32):
        group = prompts[:batch]
        times = {"tensorrt-llm": [], "static": []}
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.generate(group, SamplingParams(max_new_tokens=args.new_tokens))
            times["tensorrt-llm"].append(time.perf_counter() - start)
            torch.cuda.synchronize()
            start = time.perf_counter()
            static.generate(group, args.new_tokens)
            torch.cuda.synchronize()
            times["static"].append(time.perf_counter() - start)
        result["speed"][f"batch{batch}"] = {k: batch * args.new_tokens / min(v) for k, v in times.items()}
    out = Path(os.environ.get("OUT", "artifacts/bench")) / "trtllm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, speeds in result["speed"].items():
        print(f"{name}: TensorRT-LLM {speeds['tensorrt-llm']:.0f} tok/s, static decoder {speeds['static']:.0f} tok/s "
              f"(ratio {speeds['static'] / speeds['tensorrt-llm']:.2f})")
    print(f"greedy: {result['identical']}/{args.prompts} identical; first differences at {agree}; wrote {out}")


if __name__ == "__main__":
    main()
