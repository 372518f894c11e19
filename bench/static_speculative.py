"""Speculative decoding on the static decoder: the target alone vs the target with a draft, interleaved.

    python bench/static_speculative.py --target artifacts/reference --draft artifacts/chat-draft --device cuda

On held-out chat prompts, each prompt runs the target's own fused decoder (one CUDA graph per step)
and then, for each k, the speculator (one CUDA graph per draft-and-verify cycle), greedy, bf16 on
CUDA (fp32 PyTorch ops on the CPU). Two budgets per run: up to the end-of-turn token (what a chat
user gets) and a fixed --new-tokens (no stop). Decode rate = (tokens - 1) / decode time for both
(the first token comes from the prefill). Reports speed-ups, acceptance rate, tokens per target
pass and whether each output equals the plain greedy output. Writes
artifacts/bench/static-speculative-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import chat_prompts  # noqa: E402
from runtime import triton_decode  # noqa: E402
from runtime.loading import load_model, load_tokenizer  # noqa: E402
from runtime.static_decode import StaticDecoder  # noqa: E402
from runtime.static_speculative import StaticSpeculator  # noqa: E402


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.inference_mode()
def first_difference(model: torch.nn.Module, prompt: list[int], plain: list[int], spec: list[int]) -> dict:
    """Where a speculative output first leaves the plain one: the fp32 model's top-2 margin there.

    A near-tie (a margin within bf16 rounding) means the two bf16 kernels' roundings chose
    differently; a wide margin would mean a bug.
    """
    at = next(i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b)
    logits = model(torch.tensor([prompt + plain[:at]], device=next(model.parameters()).device)).logits[0, -1].float()
    top = logits.topk(2)
    return {"position": at, "plain": plain[at], "spec": spec[at], "fp32_top2": top.indices.tolist(),
            "fp32_margin": float(top.values[0] - top.values[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="artifacts/reference")
    parser.add_argument("--draft", default="artifacts/chat-draft")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--small", nargs="+", default=["gemv"], choices=["gemv", "gemm", "gemm+pdl"],
                        help="CUDA: kernels for the verify pass's k + 1 rows (runtime/triton_decode.py TILES['small'])")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    tokenizer = load_tokenizer(args.target)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in chat_prompts(tokenizer, args.prompts, split="heldout")]
    max_len = max(map(len, prompts)) + args.new_tokens + max(args.k) + 1
    decoders = []
    for name in (args.target, args.draft):
        decoder = StaticDecoder(load_model(name, args.device, dtype=torch.bfloat16 if cuda else torch.float32),
                              max_batch=1, max_len=max_len)
        if cuda:
            decoder.use_fused_kernels()
        decoders.append(decoder)
    target, draft = decoders
    settings = args.small if cuda else ["torch"]
    speculators = {f"{small}_k{k}": StaticSpeculator(target, draft, k) for small in settings for k in args.k}
    stop = (tokenizer.eos_token_id,)
    if cuda:  # compile the kernels and capture the graphs outside the timing (each with its verify kernels)
        target.generate([prompts[0]], 2)
        draft.generate([prompts[0]], 2)
        for name, spec in speculators.items():
            triton_decode.TILES["small"] = (name.rsplit("_k", 1)[0],)
            spec.generate(prompts[0], 2)
    reference = load_model(args.target, args.device, dtype=torch.float32)  # fp32: judge where outputs differ

    rows = []
    for ids in prompts:
        plain = target.generate([ids], args.new_tokens)[0]
        row = {"prompt_tokens": len(ids), "plain_tok_s": (len(plain) - 1) / target.timings[1]}
        draft.generate([ids], args.new_tokens)  # the draft alone: what one of its steps costs
        row["draft_tok_s"] = (args.new_tokens - 1) / draft.timings[1]
        answer = plain[:next((i + 1 for i, t in enumerate(plain) if t in stop), len(plain))]
        row["answer_tokens"] = len(answer)
        for name, spec in speculators.items():
            for budget, stop_ids, expected in (("eos", stop, answer), ("fixed", (), plain)):
                out = spec.generate(ids, args.new_tokens, stop_ids)
                s = spec.stats
                if out != expected and "first_difference" not in row:
                    row["first_difference"] = first_difference(reference, ids, plain, out)
                row[f"{name}_{budget}"] = {"tok_s": (len(out) - 1) / s.decode_s, "identical": out == expected,
                                         "cycle_ms": 1000 * s.decode_s / max(s.cycles, 1),
                                         "acceptance": s.acceptance_rate,
                                         "tokens_per_target_step": s.tokens_per_target_step}
        rows.append(row)
        print({key: (round(v, 1) if isinstance(v, float) else v) for key, v in row.items() if "_k" not in key},
              flush=True)

    summary = {"plain_tok_s": mean([r["plain_tok_s"] for r in rows]), "draft_tok_s": mean([r["draft_tok_s"] for r in rows]),
               "answer_tokens": mean([r["answer_tokens"] for r in rows])}
    print(f"\ntarget alone: {summary['plain_tok_s']:.0f} tok/s ({1000 / summary['plain_tok_s']:.3f} ms/step), draft "
          f"alone {summary['draft_tok_s']:.0f} tok/s ({1000 / summary['draft_tok_s']:.3f} ms/step); answers "
          f"{summary['answer_tokens']:.0f} tokens on average")
    print(f"{'verify_k':>12} {'budget':>6} {'tok/s':>8} {'speed-up':>9} {'accept':>7} {'tok/pass':>9} {'cycle ms':>9} "
          f"{'identical':>10}")
    for name in speculators:
        for budget in ("eos", "fixed"):
            cells = [r[f"{name}_{budget}"] for r in rows]
            entry = {"tok_s": mean([c["tok_s"] for c in cells]),
                     "speedup": mean([c["tok_s"] / r["plain_tok_s"] for c, r in zip(cells, rows, strict=True)]),
                     "acceptance": mean([c["acceptance"] for c in cells]),
                     "tokens_per_target_step": mean([c["tokens_per_target_step"] for c in cells]),
                     "cycle_ms": mean([c["cycle_ms"] for c in cells]), "identical": sum(c["identical"] for c in cells)}
            summary[f"{name}_{budget}"] = entry
            print(f"{name:>12} {budget:>6} {entry['tok_s']:>8.0f} {entry['speedup']:>8.2f}x {entry['acceptance']:>7.2f} "
                  f"{entry['tokens_per_target_step']:>9.2f} {entry['cycle_ms']:>9.3f} {entry['identical']:>7}/{len(rows)}")
    result = {"target": args.target, "draft": args.draft, "device": args.device,
              "gpu": torch.cuda.get_device_name() if cuda else None, "new_tokens": args.new_tokens,
              "draft_layers": len(draft.layers), "target_layers": len(target.layers), "rows": rows, "summary": summary}
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"static-speculative-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
