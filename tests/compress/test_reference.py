"""Integration tests on the real SmolLM2-135M-Instruct reference (slow)."""

import math
import shutil
import subprocess
import sys

import pytest
import torch

from compress.evaluate import accuracy_metrics
from compress.models import load_artifact_model, load_tokenizer
from core.data import heldout_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_model(reference_artifact):
    return load_artifact_model(reference_artifact.path), load_tokenizer(reference_artifact.path)


def test_reference_artifact_is_intact_and_described(reference_artifact):
    m = reference_artifact.manifest
    assert m["kind"] == "reference" and m["model"]["layers"] == 30 and m["model"]["hidden_size"] == 576
    assert m["model"]["parameters"] == 134_515_008
    names = {f["path"] for f in m["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


def test_chat_answer_contains_paris(reference_model):
    model, tokenizer = reference_model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_heldout_perplexity_matches_protocol(reference_model):
    model, tokenizer = reference_model
    windows = heldout_windows(tokenizer)
    assert windows.shape == (48, 512)
    res = accuracy_metrics(model, {"ref": model}, windows)["ref"]
    print(f"reference held-out perplexity {res['perplexity']:.3f} on {res['tokens']} tokens")
    assert res["tokens"] == 48 * 511
    assert res["perplexity"] == pytest.approx(30.46, abs=0.05)
    assert math.isfinite(res["perplexity"])


def test_inspect_detects_flipped_byte(reference_artifact, tmp_path):
    copy = tmp_path / "ref-copy"
    shutil.copytree(reference_artifact.path, copy)
    cmd = [sys.executable, "-m", "compress.inspect", str(copy)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "model.safetensors" in bad.stderr


def test_tokenizer_roundtrip_through_artifact(reference_model):
    _, tokenizer = reference_model
    text = "The bushfire near Hill Top forced 500 residents to leave."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and torch.tensor(ids).max() < 49152
