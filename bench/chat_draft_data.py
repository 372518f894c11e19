"""Training text for a speculative-decoding draft: chat prompts with the teacher's own greedy answers.

    python bench/chat_draft_data.py --teacher artifacts/reference --out artifacts/chat_draft.jsonl

A draft is accepted only where it predicts the target, and the target serves chat: so the draft is
distilled on chat-formatted prompts (train-split articles, several instructions) followed by the
target's greedy answer (sequence-level KD), then `python -m compress.distill --data` on the JSONL.
Held-out articles are never used, so the engine benchmark's prompts stay unseen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.loading import load_model, load_tokenizer  # noqa: E402
from train.data import load_corpus  # noqa: E402

INSTRUCTIONS = ("Summarize this news story in one sentence:", "What is the main point of this article?",
                "Write a headline for this story:", "Who are the people or groups in this story, and what happened?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="artifacts/reference")
    parser.add_argument("--out", default="artifacts/chat_draft.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--offsets", type=int, default=3, help="excerpts per article and instruction")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.teacher)
    tokenizer.padding_side = "left"
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = load_model(args.teacher, args.device, dtype=dtype)
    prompts = []
    for article in load_corpus("train"):
        words = article.split()
        for i, instruction in enumerate(INSTRUCTIONS):
            for k in range(args.offsets):
                start = (i + k * len(INSTRUCTIONS)) * 15
                excerpt = " ".join(words[start:start + 60]) or " ".join(words[:60])
                messages = [{"role": "user", "content": f"{instruction}\n\n{excerpt}"}]
                prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    prompts = prompts[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f, torch.inference_mode():
        for start in tqdm(range(0, len(prompts), args.batch_size), desc="teacher answers"):
            batch = tokenizer(prompts[start:start + args.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(args.device)
            generated = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            for prompt, row in zip(prompts[start:start + args.batch_size], generated, strict=True):
                answer = tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=False)
                answer = answer.split(tokenizer.eos_token)[0] + tokenizer.eos_token
                f.write(json.dumps({"text": prompt + answer}) + "\n")
    tmp.replace(out)
    print(f"wrote {len(prompts)} chat examples to {out}")


if __name__ == "__main__":
    main()
