"""The torch.onnx (dynamo) fallback: architectures the builder lacks, concatenating KV cache."""

import numpy as np
import onnx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from compress.artifact import open_artifact, write_artifact
from core.errors import UserError
from export.onnx import OnnxExportConfig, export_onnx
from export.onnx_torch import builder_architectures
from runtime.engine import SamplingParams
from runtime.onnx_backend import OnnxDecoder, OnnxEngine
from tests.conftest import greedy_reference

pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def gpt2_artifact(tmp_path_factory):
    from tests.conftest import make_tiny_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
    path = tmp_path_factory.mktemp("gpt2") / "reference"
    with write_artifact(path, "reference", "test", {}) as tmp:
        model.save_pretrained(tmp)
        make_tiny_tokenizer(300).save_pretrained(tmp)
    return open_artifact(path), model


def _export(artifact, out, **kw):
    return export_onnx(artifact, OnnxExportConfig(artifact=str(artifact.path), out=str(out), **kw))


def cached_logits(path, ids: list[int], prompt_len: int) -> np.ndarray:
    """Logits for `ids`: the prompt in one call, then one token per call through the cache."""
    decoder = OnnxDecoder(path)
    cache = decoder.new_cache(1, len(ids))
    parts = [decoder.forward(np.asarray([ids[:prompt_len]]), cache, 0)[0]]
    for i in range(prompt_len, len(ids)):
        parts.append(decoder.forward(np.asarray([[ids[i]]]), cache, i)[0])
    return np.concatenate(parts)


def test_builder_architectures_are_read_from_the_builder():
    known = builder_architectures()
    assert "LlamaForCausalLM" in known and "GPT2LMHeadModel" not in known


def test_unknown_architecture_falls_back_and_round_trips_with_cache(gpt2_artifact, tmp_path):
    artifact, model = gpt2_artifact
    exported = _export(artifact, tmp_path / "onnx")
    assert exported.manifest["onnx"]["builder"].startswith("torch.onnx.export")
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))[0].tolist()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(cached_logits(exported.path, ids, 7), expected, atol=1e-4, rtol=1e-4)
    out, _ = OnnxEngine(exported.path).generate([ids[:5]], SamplingParams(max_new_tokens=8))
    assert out[0] == greedy_reference(model, ids[:5], 8)


def test_llama_through_the_torch_exporter_matches_hf(tiny_artifact, tmp_path):
    from compress.models import load_artifact_model

    exported = _export(tiny_artifact, tmp_path / "onnx", exporter="torch")
    model = load_artifact_model(tiny_artifact.path).eval()
    ids = list(range(3, 19))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(cached_logits(exported.path, ids, 9), expected, atol=1e-4, rtol=1e-4)


def test_int8_fallback_quantizes_the_layers_not_the_head(gpt2_artifact, tmp_path):
    artifact, model = gpt2_artifact
    exported = _export(artifact, tmp_path / "int8", precision="int8", int8_method="dynamic")
    graph = onnx.load(str(exported.path / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert "DynamicQuantizeLinear" in ops
    head = next(node for node in graph.node if "logits" in node.output)
    assert head.op_type == "MatMul"  # float
    ids = list(range(10, 30))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = cached_logits(exported.path, ids, 20)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.8
    assert np.abs(got - expected).max() < 0.5


def test_fallback_refuses_what_it_cannot_do(gpt2_artifact, tmp_path):
    artifact, _ = gpt2_artifact
    with pytest.raises(UserError, match="int4 .* needs onnxruntime-genai's builder"):
        _export(artifact, tmp_path / "a", precision="int4")
    with pytest.raises(UserError, match="--int8-method dynamic"):
        _export(artifact, tmp_path / "b", precision="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
