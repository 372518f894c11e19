"""Training text for a speculative-decoding draft: chat prompts with the teacher's own greedy answers.

    python bench/chat_draft_data.py --teacher artifacts/reference --out artifacts/chat_draft.jsonl

A draft is accepted only where it predicts the target, and the target serves chat: so the draft is
distilled on chat-formatted prompts (train-split articles, several instructions) followed by the
target's greedy answer (sequence-level KD), then `python -m compress.distill --data` on the JSONL.
Held-out articles are never used, so the engine benchmark's prompts stay unseen. The answers
come from the static decoder (batched greedy, fused kernels and CUDA graphs on the GPU), which the
tests hold equal to HF greedy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data import load_corpus  # noqa: E402
from runtime.loading import load_model, load_tokenizer  # noqa: E402
from runtime.static_decode import StaticDecoder  # noqa: E402

INSTRUCTIONS = ("Summarize this news story in one sentence:", "What is the main point of this article?",
                "Write a headline for this story:", "Who are the people or groups in this story, and what happened?",
                "Give a short summary of this text:", "List the key facts in this story:",
                "Explain this news story in simple words:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="artifacts/reference")
    parser.add_argument("--out", default="artifacts/chat_draft.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per batch (at most 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--offsets", type=int, default=3, help="excerpts per article and instruction")
    parser.add_argument("--instructions", type=int, default=4, help=f"first N of the {len(INSTRUCTIONS)} instructions")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.teacher)
    cuda = args.device.startswith("cuda")
    model = load_model(args.teacher, args.device, dtype=torch.bfloat16 if cuda else torch.float32)
    prompts = []
    for article in load_corpus("train"):
        words = article.split()
        for i, instruction in enumerate(INSTRUCTIONS[:args.instructions]):
            for k in range(args.offsets):  # excerpts start 15 words apart, staggered across instructions
                start = ((i + k * args.instructions) * 15) % max(len(words) - 60, 1)
                excerpt = " ".join(words[start:start + 60])
                messages = [{"role": "user", "content": f"{instruction}\n\n{excerpt}"}]
                prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    prompts = prompts[: args.limit]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # the static decoder: batched greedy with fused kernels and CUDA graphs on the GPU (~100x HF generate)
    static = StaticDecoder(model, max_batch=64, max_len=max(map(len, ids)) + args.max_new_tokens)
    if cuda:
        static.use_fused_kernels()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    eos = tokenizer.eos_token_id
    with tmp.open("w") as f:
        for start in tqdm(range(0, len(prompts), args.batch_size), desc="teacher answers"):
            batch = ids[start:start + args.batch_size]
            for prompt, answer in zip(prompts[start:start + args.batch_size],
                                      static.generate(batch, args.max_new_tokens), strict=True):
                answer = answer[:answer.index(eos) + 1] if eos in answer else answer
                f.write(json.dumps({"text": prompt + tokenizer.decode(answer, skip_special_tokens=False)}) + "\n")
    tmp.replace(out)
    print(f"wrote {len(prompts)} chat examples to {out}")


if __name__ == "__main__":
    main()
