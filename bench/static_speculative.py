"""Speculative decoding on the static decoder: the target alone vs the target with a draft, interleaved.

    python bench/static_speculative.py --target artifacts/reference --draft artifacts/chat-draft --device cuda

On held-out chat prompts, each prompt runs the target's own fused decoder (one CUDA graph per step)
and then, for each k, the speculator (one CUDA graph per draft-and-verify cycle), greedy, bf16 on
CUDA (fp32 PyTorch ops on the CPU). Two budgets per run: up to the end-of-turn token (what a chat
user gets) and a fixed --new-tokens (no stop). Decode rate = (tokens - 1) / decode time for both
(the first token comes from the prefill). Reports speed-ups, acceptance rate, tokens per target
pass and whether each output equals the plain greedy output. Writes
artifacts/bench/static-speculative-<device>.json.

With an EAGLE head as --draft (`compress.draft --method eagle`), each --draft-vocab N runs the head
restricted to the N tokens most frequent in --vocab-from (its training text; 0: as trained), and
each k also times the target's verify pass alone (a CUDA graph of it), so a cycle splits into
verify and drafting. An exit head (`compress.draft --method exit-head`, the KV-sharing early exit) runs
the same way, its verify pass timed over the layers after the exit only. --lookup K... adds prompt lookup
(n-grams of the prompt and output so far) arms.
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
from runtime.eagle import is_eagle_draft, load_head  # noqa: E402
from runtime.exit_head import is_exit_head, load_exit_head  # noqa: E402
from runtime.loading import load_model, load_tokenizer  # noqa: E402
from runtime.static_decode import StaticDecoder, capture_graph  # noqa: E402
from runtime.static_speculative import (  # noqa: E402
    StaticEagleSpeculator,
    StaticExitSpeculator,
    StaticLookupSpeculator,
    StaticSpeculator,
)


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


@torch.inference_mode()
def verify_ms(target: StaticDecoder, k: int, replays: int = 200, first_layer: int = 0) -> float:
    """The target's verify pass over k + 1 rows alone (with the features an EAGLE head reads; from `first_layer`
    on, as after an exit head), from a CUDA graph."""
    tokens = torch.zeros(k + 1, 1, dtype=torch.long, device=target.device)
    features = torch.zeros(k + 1, target.embed.shape[1], dtype=target.dtype, device=target.device)
    if first_layer:
        def step() -> None:
            target.greedy(target.run_rows(features, layers=slice(first_layer, None)))
    else:
        def step() -> None:
            target.verify_step(tokens, features)
    graph = capture_graph(step, [*target.state(1)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="artifacts/reference")
    parser.add_argument("--draft", default="artifacts/chat-draft")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6])
    parser.add_argument("--stop-chunk", type=int, nargs="+", default=[2], help="cycles between looks at the output "
                        "when generating to the end of turn (several: each an arm, interleaved)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--small", nargs="+", default=["gemv"], choices=["gemv", "gemv-rows", "gemm", "gemm+pdl"],
                        help="CUDA: kernels for the verify pass's k + 1 rows (runtime/triton_decode.py TILES['small'])")
    parser.add_argument("--draft-vocab", type=int, nargs="+", default=[0],
                        help="EAGLE or exit head: propose only the N tokens most frequent in --vocab-from (0: as "
                        "trained)")
    parser.add_argument("--vocab-from", default=None, help="EAGLE head: its training text (JSONL, compress.draft's "
                        "<out>.work/target-answers-*.jsonl)")
    parser.add_argument("--lookup", type=int, nargs="*", default=[],
                        help="also prompt lookup (no draft model) with these k, beside the draft's arms")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    tokenizer = load_tokenizer(args.target)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"]
               for t in chat_prompts(tokenizer, args.prompts, split="heldout")]
    max_len = max(map(len, prompts)) + args.new_tokens + max(args.k) + 1
    eagle, exit_head = is_eagle_draft(args.draft), is_exit_head(args.draft)
    decoders, models = [], []
    for name in (args.target, None if eagle or exit_head else args.draft):
        if name is None:
            continue
        models.append(load_model(name, args.device, dtype=torch.bfloat16 if cuda else torch.float32))
        decoder = StaticDecoder(models[-1], max_batch=1, max_len=max_len)
        if cuda:
            decoder.use_fused_kernels()
        decoders.append(decoder)
    target, draft = decoders[0], (None if eagle or exit_head else decoders[1])
    settings = args.small if cuda else ["torch"]
    if eagle or exit_head:
        from compress.draft import frequent_tokens

        vocab = {v: frequent_tokens(tokenizer, Path(args.vocab_from), v) if v else None for v in args.draft_vocab}
    if eagle:
        heads = {v: load_head(args.draft, models[0], vocab[v]) for v in args.draft_vocab}
        speculators = {f"{small}_v{v}_k{k}": StaticEagleSpeculator(target, heads[v], k)
                       for small in settings for v in args.draft_vocab for k in args.k}
    elif exit_head:
        exit_model = load_exit_head(args.draft, models[0])
        speculators = {f"{small}_v{v}_k{k}": StaticExitSpeculator(target, exit_model, k, vocab[v])
                       for small in settings for v in args.draft_vocab for k in args.k}
    else:
        speculators = {f"{small}_k{k}": StaticSpeculator(target, draft, k) for small in settings for k in args.k}
    speculators.update({f"{small}_lookup_k{k}": StaticLookupSpeculator(target, k) for small in settings
                        for k in args.lookup})
    stop = (tokenizer.eos_token_id,)
    if cuda:  # compile the kernels and capture the graphs outside the timing (each with its verify kernels)
        target.generate([prompts[0]], 2)
        if draft is not None:
            draft.generate([prompts[0]], 2)
        for name, spec in speculators.items():
            triton_decode.TILES["small"] = (name.split("_")[0],)
            spec.generate(prompts[0], 2)
    reference = load_model(args.target, args.device, dtype=torch.float32)  # fp32: judge where outputs differ

    rows = []
    for ids in prompts:
        plain = target.generate([ids], args.new_tokens)[0]
        row = {"prompt_tokens": len(ids), "plain_tok_s": (len(plain) - 1) / target.timings[1]}
        if draft is not None:
            draft.generate([ids], args.new_tokens)  # the draft alone: what one of its steps costs
            row["draft_tok_s"] = (args.new_tokens - 1) / draft.timings[1]
        elif cuda:
            for small in settings:
                triton_decode.TILES["small"] = (small,)
                first = exit_model.exit_layer if exit_head else 0
                row.update({f"verify_ms_{small}_k{k}": verify_ms(target, k, first_layer=first) for k in args.k})
        answer = plain[:next((i + 1 for i, t in enumerate(plain) if t in stop), len(plain))]
        row["answer_tokens"] = len(answer)
        for name, spec in speculators.items():
            if cuda:  # lookup captures a graph per proposal count on first use: with its arm's verify kernels
                triton_decode.TILES["small"] = (name.split("_")[0],)
            runs = [(f"eos{c}" if len(args.stop_chunk) > 1 else "eos", stop, answer, c) for c in args.stop_chunk]
            for budget, stop_ids, expected, chunk in [*runs, ("fixed", (), plain, None)]:
                if chunk is not None:
                    spec.stop_chunk = chunk
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

    summary = {"plain_tok_s": mean([r["plain_tok_s"] for r in rows]),
               "answer_tokens": mean([r["answer_tokens"] for r in rows])}
    summary.update({key: mean([r[key] for r in rows]) for key in rows[0] if key.startswith(("verify_ms", "draft_tok"))})
    print(f"\ntarget alone: {summary['plain_tok_s']:.0f} tok/s ({1000 / summary['plain_tok_s']:.3f} ms/step); answers "
          f"{summary['answer_tokens']:.0f} tokens on average; "
          + ", ".join(f"{key} {value:.3f}" for key, value in summary.items() if key.startswith(("verify", "draft"))))
    print(f"{'verify_k':>12} {'budget':>6} {'tok/s':>8} {'speed-up':>9} {'accept':>7} {'tok/pass':>9} {'cycle ms':>9} "
          f"{'identical':>10}")
    budgets = [f"eos{c}" if len(args.stop_chunk) > 1 else "eos" for c in args.stop_chunk] + ["fixed"]
    for name in speculators:
        for budget in budgets:
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
              "draft_layers": (len(heads[args.draft_vocab[0]].model.layers) if eagle
                               else exit_model.exit_layer if exit_head else len(draft.layers)),
              "eagle": eagle, "exit_head": exit_head, "target_layers": len(target.layers), "rows": rows,
              "summary": summary}
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"static-speculative-{args.device.split(':')[0]}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
