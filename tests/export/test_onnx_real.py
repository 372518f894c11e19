"""The fp32 ONNX export of the real SmolLM2 reference (slow)."""

import pytest
import torch

from compress.models import load_artifact_model, load_tokenizer
from core.data import chat_prompts
from export.onnx import OnnxExportConfig, export_onnx
from runtime.engine import SamplingParams
from runtime.onnx_backend import OnnxEngine

pytestmark = pytest.mark.slow


def test_fp32_export_greedy_equals_pytorch_on_five_chat_prompts(reference_artifact, tmp_path):
    art = export_onnx(reference_artifact, OnnxExportConfig(out=str(tmp_path / "onnx-fp32"),
                                                           artifact=str(reference_artifact.path)))
    tokenizer = load_tokenizer(reference_artifact.path)
    prompts = [tokenizer(p)["input_ids"] for p in chat_prompts(tokenizer, 5)]
    outputs, _ = OnnxEngine(art.path).generate(prompts, SamplingParams(max_new_tokens=32))
    model = load_artifact_model(reference_artifact.path)
    for prompt, got in zip(prompts, outputs, strict=True):
        ids, past, expected = torch.tensor([prompt]), None, []
        with torch.inference_mode():
            for _ in range(32):  # plain greedy with the HF cache; no stop token, as the engine above
                out = model(ids, past_key_values=past, use_cache=True)
                past, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
                expected.append(int(ids))
        assert got == expected
