"""A `reference` artifact with random weights of a real model's shape, for speed measurements where the real
weights do not travel (the GPU machine): decode speed does not depend on the weights' values.

Usage: python bench/random_artifact.py --like artifacts/reference --out DIR [--dtype bfloat16]
`--like` needs only the model's config.json and tokenizer files (no weights are read).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.artifact import write_artifact  # noqa: E402
from compress.models import describe_model  # noqa: E402

SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, help="folder with the model's config.json and tokenizer files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    like = Path(args.like)
    if not (like / "config.json").is_file():
        sys.exit(f"error: {like / 'config.json'} not found")
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(like)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    with write_artifact(args.out, "reference", "bench.random_artifact", {"like": str(like), "seed": args.seed},
                       overwrite=True, extra={"model": describe_model(model)}) as tmp:
        model.save_pretrained(tmp)
        for name in SHAPE_FILES[1:]:
            if (like / name).is_file():
                shutil.copy(like / name, tmp / name)
    print(f"wrote {args.out} (random weights of {like}'s shape, {args.dtype})")


if __name__ == "__main__":
    main()
