"""Text data: the default corpus and its fixed split, user files, tokenization, packing, chat prompts.

The default corpus is the Lee news corpus shipped inside gensim's wheel (300 articles, one per
line), so everything runs offline. Articles 0-199 are for training and calibration, 200-299 are
held out for evaluation and never used for anything else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError

CORPUS_FILE = "lee_background.cor"
TRAIN_ARTICLES = range(0, 200)
HELDOUT_ARTICLES = range(200, 300)
SPLITS = ("train", "heldout", "all")
JOIN = "\n\n"
EVAL_SEQ_LEN = 512


class DataWarning(UserWarning):
    """Something in a user's data file was skipped."""


def corpus_path() -> Path:
    """Locate lee_background.cor inside the installed gensim package (without importing gensim).

    SHRINKWRAP_CORPUS_FILE points elsewhere (a machine without gensim, e.g. the GPU box).
    """
    override = os.environ.get("SHRINKWRAP_CORPUS_FILE")
    if override:
        if not Path(override).is_file():
            raise UserError(f"SHRINKWRAP_CORPUS_FILE: file not found: {override}")
        return Path(override)
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default corpus needs the 'gensim' package (pip install gensim)")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / CORPUS_FILE
    if not path.is_file():
        raise UserError(f"default corpus file not found: {path}")
    return path


def load_corpus(split: str = "train") -> list[str]:
    """The default corpus's articles for `split` (train: 0-199, heldout: 200-299, all)."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    # Lines are kept as shipped (with their trailing space): the protocol's 30.46 depends on it.
    articles = corpus_path().read_text(encoding="utf-8").splitlines()
    if len(articles) != 300:
        raise UserError(f"{corpus_path()}: expected 300 articles, found {len(articles)}")
    if split == "train":
        return articles[TRAIN_ARTICLES.start:TRAIN_ARTICLES.stop]
    if split == "heldout":
        return articles[HELDOUT_ARTICLES.start:HELDOUT_ARTICLES.stop]
    return articles


def _decode_utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                        f"convert it first, e.g. iconv -f latin1 -t utf-8") from None


def _read_text_file(path: Path) -> list[str]:
    """Documents separated by blank lines."""
    text = _decode_utf8(path, path.read_bytes())
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _read_jsonl(path: Path, field: str) -> list[str]:
    text = _decode_utf8(path, path.read_bytes())
    docs, skipped = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            skipped.append(number)
            continue
        docs.append(value)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} line(s) without a text field '{field}': line {shown}",
                      DataWarning, stacklevel=3)
    return docs


def _read_parquet(path: Path, field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    if field not in ds.column_names:
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(ds.column_names)})")
    values = ds[field]
    docs = [v for v in values if isinstance(v, str) and v.strip()]
    if len(docs) < len(values):
        warnings.warn(f"{path}: skipped {len(values) - len(docs)} row(s) with an empty or non-text '{field}'",
                      DataWarning, stacklevel=3)
    return docs


def load_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a local .txt / .jsonl / .parquet file, with one-line errors naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md", ".cor"):
        docs = _read_text_file(path)
    elif suffix in (".jsonl", ".ndjson"):
        docs = _read_jsonl(path, text_field)
    elif suffix == ".parquet":
        docs = _read_parquet(path, text_field)
    else:
        raise UserError(f"{path}: unsupported data file type '{suffix}' (use .txt, .jsonl or .parquet)")
    if not docs:
        raise UserError(f"{path}: no text found")
    return docs


def load_split_or_file(source: str | None, split: str = "train", text_field: str = "text") -> list[str]:
    """The default corpus split when `source` is None, else the user's file."""
    return load_corpus(split) if source is None else load_texts(source, text_field)


def texts_hash(texts: list[str]) -> str:
    """Identifies calibration/training data in manifests."""
    import hashlib

    return hashlib.sha256(JOIN.join(texts).encode("utf-8")).hexdigest()


def tokenize_joined(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents joined by a blank line, tokenized without special tokens: one 1-D tensor."""
    ids = tokenizer(JOIN.join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(tokens: torch.Tensor, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping `seq_len` windows (the remainder is dropped): shape (n, seq_len)."""
    if seq_len <= 0:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    n = tokens.numel() // seq_len
    if n == 0:
        raise UserError(f"the data has {tokens.numel()} tokens, fewer than one block of {seq_len}")
    if max_blocks is not None:
        n = min(n, max_blocks)
    return tokens[: n * seq_len].view(n, seq_len)


def sample_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n` windows of `seq_len` at random offsets (GPTQ-style calibration sampling): (n, seq_len)."""
    if tokens.numel() <= seq_len:
        raise UserError(f"the data has {tokens.numel()} tokens, need more than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n,), generator=gen)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def heldout_windows(tokenizer: Any, seq_len: int = EVAL_SEQ_LEN, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation protocol's windows: held-out articles joined, 512-token non-overlapping windows."""
    windows = pack_blocks(tokenize_joined(tokenizer, load_corpus("heldout")), seq_len)
    if max_tokens is not None:
        windows = windows[: max(1, max_tokens // seq_len)]
    return windows


def chat_prompts(tokenizer: Any, n: int, split: str = "heldout", words: int = 60) -> list[str]:
    """Chat-formatted summarisation prompts from corpus articles, for generation benchmarks."""
    articles = load_corpus(split)
    prompts = []
    for article in articles[:n]:
        excerpt = " ".join(article.split()[:words])
        messages = [{"role": "user", "content": f"Summarize this news story in one sentence:\n\n{excerpt}"}]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts
