"""Runtime engine benchmark: prefix-cache time to first token, and speculative decoding.

    python bench/engine.py --target artifacts/reference --draft artifacts/distilled [--prompts 4 --new-tokens 64]

(1) Prefix caching: time to first token of a sequence whose 512-token prefix is new, then of a
second sequence sharing that prefix (its blocks come from the cache). (2) On held-out chat prompts,
greedy decoding (to the end-of-turn token, at most --new-tokens), interleaved prompt by prompt:
the engine alone, with the draft model for each --k (`--draft none` skips it; an EAGLE head from
`compress.draft --method eagle` runs on the target's features, `--draft-vocab N` restricting it to the N
tokens most frequent in --vocab-from), with prompt lookup as the draft, and the baseline, transformers' `generate` plain and with its `prompt_lookup_num_tokens`. Decode
tokens/s, speed-ups, acceptance rate and tokens per target step; every output is checked against
the engine's plain output. Writes artifacts/bench/engine-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from core.data import chat_prompts, heldout_windows
from runtime.eagle import EagleDraft, is_eagle_draft, load_head
from runtime.engine import Engine, LookupFirstDraft, ModelDraft, PromptLookupDraft, SamplingParams
from runtime.exit_head import is_exit_head, load_exit_head, self_speculative
from runtime.loading import load_model, load_tokenizer


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, ids: list[int], max_new: int, stop: tuple[int, ...], **extra) -> list[int]:
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)
    out = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=list(stop) or None, pad_token_id=0, **extra)
    return out[0, len(ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="artifacts/reference")
    parser.add_argument("--draft", default="artifacts/distilled")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[4])
    parser.add_argument("--draft-vocab", type=int, default=0, help="EAGLE head: propose only the N most frequent "
                        "tokens of --vocab-from (0: as trained)")
    parser.add_argument("--vocab-from", default=None, help="EAGLE head: its training text (JSONL)")
    parser.add_argument("--tree-width", type=int, nargs="*", default=[], help="EAGLE head: also draft trees, "
                        "the head's chain of k with width - 1 more candidates beside each token (arms tree_w<W>_k<k>)")
    parser.add_argument("--confidence", type=float, nargs="*", default=[], help="EAGLE head: also arms that stop "
                        "drafting before a token the head gives a probability below this (arms conf<p>_k<k>)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lookup-k", type=int, default=2, help="prompt lookup: tokens proposed per step")
    parser.add_argument("--lookup-ngram", type=int, default=3, help="prompt lookup: longest n-gram matched")
    parser.add_argument("--lookup-min-ngram", type=int, default=1, help="prompt lookup: shortest n-gram matched")
    parser.add_argument("--stop", action=argparse.BooleanOptionalAction, default=True,
                        help="stop at the end-of-turn token (else exactly --new-tokens)")
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

    model = target.runner.model
    draft = exit_head = None
    if args.draft != "none" and is_exit_head(args.draft):  # the target's own first layers + a trained exit
        exit_head = load_exit_head(args.draft, model)
        draft = lambda: exit_head  # noqa: E731
    elif args.draft != "none" and is_eagle_draft(args.draft):
        from compress.draft import frequent_tokens

        vocab = frequent_tokens(tokenizer, Path(args.vocab_from), args.draft_vocab) if args.draft_vocab else None
        head = load_head(args.draft, model, vocab)
        draft = lambda confidence=0.0: EagleDraft(head, target.runner,  # noqa: E731 - per-sequence state
                                                  min_confidence=confidence)
    elif args.draft != "none":
        engine = Engine(load_model(args.draft, args.device), block_size=16, num_blocks=512)
        draft = lambda: engine  # noqa: E731
    def model_draft(d):  # what LookupFirstDraft wraps: an EAGLE head's per-sequence drafter, or a model's
        return ModelDraft(d) if isinstance(d, Engine) else d

    rows = []
    eos = (tokenizer.eos_token_id,) if args.stop else ()
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_ids=eos)
    for text in chat_prompts(tokenizer, args.prompts, split="heldout"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        (plain,), p_stats = target.generate([ids], params)
        row = {"prompt_tokens": len(ids), "new_tokens": len(plain), "plain_tok_s": p_stats.new_tokens / p_stats.decode_s,
               "plain_e2e_tok_s": p_stats.new_tokens / (p_stats.prefill_s + p_stats.decode_s)}
        arms = {"lookup": (PromptLookupDraft(args.lookup_ngram, args.lookup_min_ngram), args.lookup_k)}
        if draft is not None:
            arms.update({f"spec_k{k}": (draft, k) for k in args.k})
            if is_eagle_draft(args.draft):
                arms.update({f"tree_w{w}_k{k}": (draft, k) for w in args.tree_width for k in args.k})
                arms.update({f"conf{c}_k{k}": (lambda c=c: draft(c), k) for c in args.confidence for k in args.k})
            if exit_head is None:
                arms.update({f"lookup_first_k{k}": (lambda: LookupFirstDraft(  # noqa: E731
                    PromptLookupDraft(args.lookup_ngram, args.lookup_min_ngram),
                    model_draft(draft()), args.lookup_k), k) for k in args.k})
        for name, (drafter, k) in arms.items():
            width = int(name.split("_")[1][1:]) if name.startswith("tree_") else 1
            if exit_head is not None and name.startswith("spec_k"):
                out, s_stats = self_speculative(target, exit_head, ids, params, k)
            else:
                out, s_stats = target.speculative(drafter() if callable(drafter) else drafter, ids, params, k=k,
                                                  tree_width=width)
            if width > 1:
                row[f"{name}_leaves_accepted"] = s_stats.leaves_accepted / max(1, s_stats.target_steps)
            row.update({f"{name}_identical": out == plain, f"{name}_tok_s": s_stats.new_tokens / s_stats.decode_s,
                        f"{name}_e2e_tok_s": s_stats.new_tokens / (s_stats.prefill_s + s_stats.decode_s),
                        f"{name}_acceptance": s_stats.acceptance_rate,
                        f"{name}_tokens_per_target_step": s_stats.tokens_per_target_step})
        for name, extra in (("hf", {}), ("hf_lookup", {"prompt_lookup_num_tokens": args.lookup_k})):  # baseline
            started = time.perf_counter()
            out = hf_generate(model, ids, len(plain), eos, **extra)
            row[f"{name}_e2e_tok_s"] = len(out) / (time.perf_counter() - started)
            row[f"{name}_identical"] = out == plain
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    total = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if not k.endswith("identical")}
    total.update({k: all(r[k] for r in rows) for k in rows[0] if k.endswith("identical")})
    trees = [f"tree_w{w}_k{k}" for w in args.tree_width for k in args.k] + [
        f"conf{c}_k{k}" for c in args.confidence for k in args.k]
    for name in [f"spec_k{k}" for k in args.k] + trees + [f"lookup_first_k{k}" for k in args.k] + ["lookup"]:
        if f"{name}_tok_s" in total:
            total[f"{name}_speedup"] = sum(r[f"{name}_tok_s"] / r["plain_tok_s"] for r in rows) / len(rows)
    total["hf_lookup_speedup"] = sum(r["hf_lookup_e2e_tok_s"] / r["hf_e2e_tok_s"] for r in rows) / len(rows)
    total["lookup_vs_hf_lookup_e2e"] = sum(r["lookup_e2e_tok_s"] / r["hf_lookup_e2e_tok_s"] for r in rows) / len(rows)
    result.update(rows=rows, mean=total, torch_threads=torch.get_num_threads(), lookup_k=args.lookup_k,
                  lookup_ngram=(args.lookup_min_ngram, args.lookup_ngram), stop_at_eos=args.stop)
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"engine-{args.device}.json").write_text(json.dumps(result, indent=2))
    print(f"\nplain decode {total['plain_tok_s']:.1f} tok/s; answers {total['new_tokens']:.0f} tokens")
    for k in args.k if draft is not None else []:
        for arm, label in ((f"spec_k{k}", f"draft model (k={k})"),
                           *((f"tree_w{w}_k{k}", f"EAGLE tree (k={k}, width {w})") for w in args.tree_width),
                           *((f"conf{c}_k{k}", f"EAGLE head, drafting while p >= {c} (k <= {k})")
                             for c in args.confidence),
                           (f"lookup_first_k{k}", f"lookup first (k={args.lookup_k}), else the draft (k={k})")):
            if f"{arm}_tok_s" not in total:
                continue
            spec = {key.removeprefix(f"{arm}_"): v for key, v in total.items() if key.startswith(f"{arm}_")}
            print(f"{label}: acceptance {spec['acceptance']:.2f}, {spec['tokens_per_target_step']:.2f} tokens/target "
                  f"step, {spec['tok_s']:.1f} tok/s ({spec['speedup']:.2f}x), identical: {spec['identical']}")
    print(f"prompt lookup (k={args.lookup_k}, n<={args.lookup_ngram}): acceptance {total['lookup_acceptance']:.2f}, "
          f"{total['lookup_tokens_per_target_step']:.2f} tokens/target step, {total['lookup_tok_s']:.1f} tok/s "
          f"({total['lookup_speedup']:.2f}x), identical: {total['lookup_identical']}")
    print(f"HF generate end to end: plain {total['hf_e2e_tok_s']:.1f}, prompt lookup {total['hf_lookup_e2e_tok_s']:.1f} "
          f"tok/s ({total['hf_lookup_speedup']:.2f}x); ours with lookup / HF with lookup: "
          f"{total['lookup_vs_hf_lookup_e2e']:.2f}x")

if __name__ == "__main__":
    main()
