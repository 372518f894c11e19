"""The serving core with an EAGLE head against the same core without one, interleaved, without HTTP.

Usage: python bench/speculative_serving.py [--target ARTIFACT] [--draft DRAFT] [--clients 1 8 64] [--profile 1 8]
Without --target: random weights of SmolLM2-135M's shape (bf16 on CUDA); without --draft: a head made by
`new_head` (its layer a copy of the target's last one: on random weights acceptance means little, the costs
are what is measured). Greedy requests, prompts 64-192 random tokens, `--new-tokens` each, `clients` in
flight. Per concurrency: plain then with the head (`--per-sequence`: also drafting per sequence), tok/s, acceptance and the steps by kind; `--profile C`:
at C clients the head's run again under cProfile, the 25 costliest functions. Writes artifacts/bench/speculative_serving.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.paged_decode import SMOLLM2  # noqa: E402
from bench.scheduler_load import load  # noqa: E402
from runtime.eagle import load_head, new_head  # noqa: E402


def profiled(model, prompts, clients, new_tokens, head, k) -> str:
    """The head's run with the scheduler thread's steps under cProfile: the 25 costliest functions."""
    profile = cProfile.Profile()
    load(model, prompts, clients, new_tokens, "fused", draft=head, k=k, profile=profile)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", help="a model artifact (default: random weights of SmolLM2-135M's shape)")
    parser.add_argument("--draft", help="an EAGLE draft artifact (default: a head copied from the target)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30, help="layers of the random target")
    parser.add_argument("--per-sequence", action="store_true",
                        help="also the head drafting per sequence (one head pass per sequence and token)")
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="CLIENTS",
                        help="at these concurrencies, also profile the head's run (cProfile)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.target:
        from runtime.loading import load_model

        model = load_model(args.target, args.device, dtype)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers})).to(args.device, dtype)
    model.eval()
    head = (load_head(args.draft, model) if args.draft else new_head(model).to(args.device)).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (int(n),), generator=gen).tolist()
               for n in torch.randint(64, 193, (max(args.clients) * args.requests_per_client,), generator=gen)]
    load(model, prompts[:4], 2, 16, "fused", draft=head, k=args.k)  # warm-up: kernels, graphs
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
              "target": args.target or "random", "draft": args.draft or "new_head", "k": args.k,
              "command": "python bench/speculative_serving.py " + " ".join(sys.argv[1:]), "runs": []}
    for clients in args.clients:
        batch = prompts[:clients * args.requests_per_client]
        plain = load(model, batch, clients, args.new_tokens, "fused")
        spec = load(model, batch, clients, args.new_tokens, "fused", draft=head, k=args.k)
        row = {"clients": clients, "plain": plain, "head": spec,
               "ratio": round(spec["output_tok_s"] / plain["output_tok_s"], 3)}
        line = (f"clients {clients}: plain {plain['output_tok_s']} tok/s, head {spec['output_tok_s']} tok/s "
                f"(x{row['ratio']}, acceptance {spec['acceptance']})")
        if args.per_sequence:
            alone = load(model, batch, clients, args.new_tokens, "fused", draft=head, k=args.k, drafting_together=False)
            row["head_per_sequence"] = alone
            row["ratio_per_sequence"] = round(alone["output_tok_s"] / plain["output_tok_s"], 3)
            line += f", head drafting per sequence {alone['output_tok_s']} tok/s (x{row['ratio_per_sequence']})"
        print(f"{line}; steps plain {plain['steps']}; head {spec['steps']}", flush=True)
        if clients in args.profile:
            text = profiled(model, batch, clients, args.new_tokens, head, args.k)
            row["profile"] = text
            print(text, flush=True)
        result["runs"].append(row)
    path = ROOT / "artifacts" / "bench" / "speculative_serving.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
