"""The server's streaming detokenization: incremental `TextStream.push` against decoding the whole answer per token.

    python bench/detokenize.py --tokenizer artifacts/reference --tokens 128 256 512

Host time per streamed token (the API server's own work, on the critical path of every request), on the
reference's answers-like text (held-out articles re-encoded), both ways interleaved, best of --repeats.
The baseline is what `TextStream` did before: `tokenizer.decode(all tokens so far)` on every token.
Writes artifacts/bench/detokenize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import load_corpus  # noqa: E402
from runtime.loading import load_tokenizer  # noqa: E402
from runtime.openai_api import TextStream  # noqa: E402


def whole_decode(tokenizer, ids: list[int]) -> str:
    sent, text = 0, ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sent = len(text)
    return text[:sent]


def incremental(tokenizer, ids: list[int]) -> str:
    stream = TextStream(tokenizer, ["\n\n\n"])
    return "".join(stream.push(t) for t in ids) + stream.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="artifacts/reference")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--answers", type=int, default=16, help="answers per length")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    articles = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in load_corpus("heldout")]
    results = {}
    for n in args.tokens:
        answers = [a[:n] for a in articles if len(a) >= n][:args.answers]
        best = {"whole": float("inf"), "incremental": float("inf")}
        for _ in range(args.repeats):
            for name, fn in (("whole", whole_decode), ("incremental", incremental)):
                start = time.perf_counter()
                for ids in answers:
                    fn(tokenizer, ids)
                best[name] = min(best[name], (time.perf_counter() - start) / (len(answers) * n))
        same = all(whole_decode(tokenizer, ids).rstrip("\n") == incremental(tokenizer, ids).rstrip("\n")
                   for ids in answers)
        results[n] = {"answers": len(answers), "whole_us_per_token": 1e6 * best["whole"],
                      "incremental_us_per_token": 1e6 * best["incremental"],
                      "speedup": best["whole"] / best["incremental"], "same_text": same}
        r = results[n]
        print(f"{n:>5} tokens: whole decode {r['whole_us_per_token']:.1f} us/token, incremental "
              f"{r['incremental_us_per_token']:.1f} us/token ({r['speedup']:.1f}x), same text: {same}")
    out = Path(os.environ.get("OUT", "artifacts/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "detokenize.json").write_text(json.dumps({"tokenizer": args.tokenizer, "results": results}, indent=2))
    print(f"wrote {out / 'detokenize.json'}")


if __name__ == "__main__":
    main()
