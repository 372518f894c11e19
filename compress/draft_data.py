"""A draft's training and evaluation text: chat prompts from the corpus with the target's own greedy answers.

A draft is accepted only where it predicts the target, and the target serves chat: so it learns from
chat-formatted prompts (train-split articles under several instructions) followed by the target's
greedy answer (sequence-level KD). Held-out articles give the prompts its acceptance is measured on.
Answers come from the static decoder (batched greedy; fused kernels and CUDA graphs on a GPU), which
the tests hold equal to HF greedy, and are cached under the work folder, keyed by the target's
content hash and everything that shapes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.data import load_corpus

INSTRUCTIONS = ("Summarize this news story in one sentence:", "What is the main point of this article?",
                "Write a headline for this story:", "Who are the people or groups in this story, and what happened?",
                "Give a short summary of this text:", "List the key facts in this story:",
                "Explain this news story in simple words:")


def chat_prompts(tokenizer: Any, split: str, count: int, excerpt_words: int = 60) -> list[str]:
    """`count` prompts: an instruction and an excerpt of a `split` article, in the tokenizer's chat template
    (plain "instruction, excerpt" text where it has none)."""
    prompts: list[str] = []
    articles = [a.split() for a in load_corpus(split)]
    for k in range(count):
        words = articles[k % len(articles)]
        instruction = INSTRUCTIONS[(k // len(articles)) % len(INSTRUCTIONS)]
        start = (k // len(articles) * 15) % max(len(words) - excerpt_words, 1)
        text = f"{instruction}\n\n{' '.join(words[start:start + excerpt_words])}"
        if getattr(tokenizer, "chat_template", None):
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                         add_generation_prompt=True))
        else:
            prompts.append(text + "\n")
        if len(prompts) == count:
            break
    return prompts


def encode(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def target_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   cache_dir: Path, target_hash: str, batch_size: int = 64) -> Path:
    """JSONL of {"text": prompt + answer} (answers cut after the first end-of-sequence token), written once
    per (target, prompts, length) and reused after (a resumed or repeated run)."""
    key = hashlib.sha256(json.dumps([target_hash, prompts, max_new_tokens]).encode()).hexdigest()[:16]
    out = cache_dir / f"target-answers-{key}.jsonl"
    if out.is_file():
        return out
    from runtime.static_decode import StaticDecoder

    ids = encode(tokenizer, prompts)
    static = StaticDecoder.fastest(model, max_batch=min(batch_size, len(ids)),
                                   max_len=max(map(len, ids)) + max_new_tokens)
    eos = tokenizer.eos_token_id
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w") as f:
        for start in tqdm(range(0, len(ids), static.max_batch), desc="target answers"):
            batch = ids[start:start + static.max_batch]
            for prompt, answer in zip(prompts[start:start + len(batch)], static.generate(batch, max_new_tokens),
                                      strict=True):
                answer = answer[:answer.index(eos) + 1] if eos in answer else answer
                f.write(json.dumps({"text": prompt + tokenizer.decode(answer, skip_special_tokens=False)}) + "\n")
    tmp.replace(out)
    return out
