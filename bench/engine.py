"""Runtime engine benchmark: prefix-cache time to first token, and speculative decoding.

    python bench/engine.py --target artifacts/reference --draft artifacts/distilled [--prompts 4 --new-tokens 64]

(1) Prefix caching: time to first token of a sequence whose 512-token prefix is new, then of a
second sequence sharing that prefix (its blocks come from the cache). (2) On held-out chat prompts,
greedy decoding without and with the draft, interleaved prompt by prompt, same engine: decode
tokens/s of each, the speed-up, the acceptance rate and mean tokens per target step; outputs are
checked to be identical. Writes artifacts/bench/engine-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from runtime.engine import Engine, SamplingParams
from runtime.loading import load_model, load_tokenizer
from train.data import chat_prompts, heldout_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="artifacts/reference")
    parser.add_argument("--draft", default="artifacts/distilled")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.target)
    target = Engine(load_model(args.target, args.device), block_size=16, num_blocks=512)
    result: dict = {"target": args.target, "draft": args.draft, "device": args.device, "k": args.k}

    prefix = heldout_windows(tokenizer)[0].tolist()
    target.generate([heldout_windows(tokenizer)[1].tolist()[:64]], SamplingParams(max_new_tokens=2))  # warm-up
    first_start = time.perf_counter()
    target.generate([prefix + [13]], SamplingParams(max_new_tokens=1))
    first = time.perf_counter() - first_start
    second_start = time.perf_counter()
    _, stats = target.generate([prefix + [30]], SamplingParams(max_new_tokens=1))
    second = time.perf_counter() - second_start
    result["prefix"] = {"ttft_first_s": first, "ttft_shared_s": second, "ratio": second / first,
                        "shared_blocks": stats.prefix_hit_blocks}
    print(f"prefix cache: TTFT {first * 1000:.0f} ms -> {second * 1000:.0f} ms with a shared 512-token prefix "
          f"({stats.prefix_hit_blocks} blocks reused, ratio {second / first:.3f})", flush=True)

    draft = Engine(load_model(args.draft, args.device), block_size=16, num_blocks=512)
    rows = []
    params = SamplingParams(max_new_tokens=args.new_tokens)
    for text in chat_prompts(tokenizer, args.prompts, split="heldout"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        (plain,), p_stats = target.generate([ids], params)
        spec, s_stats = target.speculative(draft, ids, params, k=args.k)
        rows.append({"prompt_tokens": len(ids), "identical": plain == spec,
                     "plain_tok_s": p_stats.new_tokens / p_stats.decode_s,
                     "spec_tok_s": s_stats.new_tokens / s_stats.decode_s,
                     "acceptance": s_stats.acceptance_rate, "tokens_per_target_step": s_stats.tokens_per_target_step})
        print(rows[-1], flush=True)
    total = {k: sum(r[k] for r in rows) / len(rows) for k in ("plain_tok_s", "spec_tok_s", "acceptance",
                                                               "tokens_per_target_step")}
    total["speedup"] = total["spec_tok_s"] / total["plain_tok_s"]
    total["all_identical"] = all(r["identical"] for r in rows)
    result.update(rows=rows, mean=total, torch_threads=torch.get_num_threads())
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"engine-{args.device}.json").write_text(json.dumps(result, indent=2))
    print(f"\nspeculative (k={args.k}): acceptance {total['acceptance']:.2f}, {total['tokens_per_target_step']:.2f} "
          f"tokens/target step, decode {total['plain_tok_s']:.1f} -> {total['spec_tok_s']:.1f} tok/s "
          f"({total['speedup']:.2f}x), greedy outputs identical: {total['all_identical']}")


if __name__ == "__main__":
    main()
