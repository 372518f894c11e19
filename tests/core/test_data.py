import json

import pytest
import torch

from core.data import (
    DataWarning,
    chat_prompts,
    heldout_windows,
    load_corpus,
    load_split_or_file,
    load_texts,
    pack_blocks,
    sample_windows,
    texts_hash,
)
from core.errors import UserError


def test_corpus_split_is_fixed_and_disjoint():
    train, heldout, everything = load_corpus("train"), load_corpus("heldout"), load_corpus("all")
    assert len(train) == 200 and len(heldout) == 100 and everything == train + heldout
    assert not set(train) & set(heldout)
    assert heldout[0].startswith(everything[200][:40])
    with pytest.raises(UserError, match="unknown split"):
        load_corpus("test")


def test_text_file_documents_split_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nstill first\n\n\nsecond doc\n")
    assert load_texts(f) == ["first doc\nstill first", "second doc"]


def test_non_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("ok line\nsecond line caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt: line 2: not UTF-8"):
        load_texts(f)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"empty\.txt: file is empty"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="no text found"):
        load_texts(tmp_path / "blank.txt")
    with pytest.raises(UserError, match="data file not found"):
        load_texts(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported data file type"):
        load_texts(tmp_path / "x.csv")


def test_jsonl_missing_field_warns_with_line_and_bad_json_fails(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "x"}) + "\n\n" + json.dumps({"text": "two"}))
    with pytest.warns(DataWarning, match=r"d\.jsonl: skipped 1 line.*line 2"):
        assert load_texts(f) == ["one", "two"]
    f.write_text(json.dumps({"text": "one"}) + "\n{broken\n")
    with pytest.raises(UserError, match=r"d\.jsonl: line 2: not valid JSON"):
        load_texts(f)


def test_parquet_through_datasets(tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"content": ["alpha", "", "beta"]}).to_parquet(str(path))
    with pytest.warns(DataWarning):
        assert load_texts(path, text_field="content") == ["alpha", "beta"]
    with pytest.raises(UserError, match="no column 'text'"):
        load_texts(path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable Parquet"):
        load_texts(tmp_path / "bad.parquet")


def test_packing_and_sampling():
    tokens = torch.arange(1000)
    blocks = pack_blocks(tokens, 128)
    assert blocks.shape == (7, 128) and torch.equal(blocks[1], torch.arange(128, 256))
    assert pack_blocks(tokens, 128, max_blocks=3).shape == (3, 128)
    windows = sample_windows(tokens, 5, 100, seed=1)
    assert windows.shape == (5, 100) and torch.equal(windows, sample_windows(tokens, 5, 100, seed=1))
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 100)) for w in windows)
    with pytest.raises(UserError, match="fewer than one block"):
        pack_blocks(torch.arange(10), 128)


def test_heldout_windows_and_prompts_with_tiny_tokenizer(tiny_tokenizer):
    windows = heldout_windows(tiny_tokenizer, seq_len=256)
    assert windows.shape[1] == 256 and windows.shape[0] > 50
    assert heldout_windows(tiny_tokenizer, seq_len=256, max_tokens=600).shape == (2, 256)
    prompts = chat_prompts(tiny_tokenizer, 3)
    assert len(prompts) == 3 and all(p.endswith("<|im_start|>assistant\n") for p in prompts)
    assert load_corpus("heldout")[0].split()[0] in prompts[0]


def test_default_source_and_hash():
    assert load_split_or_file(None, "train") == load_corpus("train")
    assert texts_hash(["a", "b"]) != texts_hash(["ab"])
