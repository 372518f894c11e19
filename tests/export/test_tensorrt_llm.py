"""TensorRT-LLM checkpoints proven by an independent reader of TensorRT-LLM's weight semantics."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from compress.quantize import QuantizeConfig, quantize
from core.errors import UserError
from export.tensorrt_llm import TrtllmExportConfig, export_trtllm
from tests.conftest import make_tiny_llama, save_reference
from tests.export.trtllm_reader import Reader

IDS = [5, 17, 300, 42, 9, 77, 123, 8, 256, 31, 64, 2]


def make(tmp_path, tokenizer, name="ref", **kw):
    model = make_tiny_llama(vocab_size=len(tokenizer), **kw)
    return save_reference(tmp_path / name, model, tokenizer), model


def export(artifact, tmp_path, name="trt", **kw):
    kw.setdefault("dtype", "float32")
    return export_trtllm(artifact, TrtllmExportConfig(artifact=str(artifact.path), out=str(tmp_path / name), **kw))


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("tie", [True, False])
def test_reader_reproduces_hf_logits_and_a_swapped_mlp_does_not(tmp_path, tiny_tokenizer, tie):
    artifact, model = make(tmp_path, tiny_tokenizer, tie=tie, heads=4, kv_heads=2)
    trt = export(artifact, tmp_path)
    config = json.loads((trt.path / "config.json").read_text())
    assert config["architecture"] == "LlamaForCausalLM" and config["position_embedding_type"] == "rope_gpt_neox"
    assert (config["num_key_value_heads"], config["head_size"], config["tie_word_embeddings"]) == (2, 16, tie)
    tensors = load_file(trt.path / "rank0.safetensors")
    assert "lm_head.weight" in tensors  # written even when tied
    assert tensors["transformer.layers.0.attention.qkv.weight"].shape == (64 + 2 * 32, 64)
    expected = hf_logits(model)
    np.testing.assert_allclose(Reader(trt.path).logits(IDS), expected, atol=2e-4, rtol=1e-4)
    from compress.artifact import load_snippet

    snippet = load_snippet(trt.manifest)
    assert snippet in (trt.path / "README.md").read_text()
    exec(compile(snippet, "card", "exec"), {"PATH": str(trt.path)})  # the card's snippet runs
    swapped = Reader(trt.path, swap_fc_gate=True).logits(IDS)
    assert np.abs(swapped - expected).max() > 1e-2  # the reader can tell fc (activated) from gate


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_ranks_sum_to_the_same_logits(tmp_path, tiny_tokenizer, tp):
    artifact, model = make(tmp_path, tiny_tokenizer, heads=4, kv_heads=2, tie=False)
    one = load_file(export(artifact, tmp_path, "tp1").path / "rank0.safetensors")
    trt = export(artifact, tmp_path, f"tp{tp}", tp_size=tp)
    np.testing.assert_allclose(Reader(trt.path).logits(IDS), hf_logits(model), atol=2e-4, rtol=1e-4)
    ranks = [load_file(trt.path / f"rank{r}.safetensors") for r in range(tp)]
    for name in ("mlp.fc", "mlp.gate"):  # column-parallel: output dimension
        full = np.concatenate([r[f"transformer.layers.1.{name}.weight"] for r in ranks], 0)
        np.testing.assert_array_equal(full, one[f"transformer.layers.1.{name}.weight"])
    for name in ("attention.dense", "mlp.proj"):  # row-parallel: input dimension
        full = np.concatenate([r[f"transformer.layers.1.{name}.weight"] for r in ranks], 1)
        np.testing.assert_array_equal(full, one[f"transformer.layers.1.{name}.weight"])
    q_rows = 64 // tp
    qkv = [r["transformer.layers.0.attention.qkv.weight"] for r in ranks]
    np.testing.assert_array_equal(np.concatenate([w[:q_rows] for w in qkv]), one["transformer.layers.0.attention.qkv.weight"][:64])
    kv_rows = max(2 // tp, 1) * 16
    k_parts = [w[q_rows:q_rows + kv_rows] for w in qkv]
    k_full = one["transformer.layers.0.attention.qkv.weight"][64:96]
    if tp == 2:
        np.testing.assert_array_equal(np.concatenate(k_parts), k_full)
    else:  # 2 KV heads over 4 ranks: each head repeated on two ranks, as TensorRT-LLM does
        np.testing.assert_array_equal(np.concatenate(k_parts[::2]), k_full)
        np.testing.assert_array_equal(k_parts[0], k_parts[1])
    np.testing.assert_array_equal(np.concatenate([r["lm_head.weight"] for r in ranks]), one["lm_head.weight"])


def test_gptq_w4a16_dequantizes_to_the_gptq_weights(tmp_path, tiny_tokenizer):
    from runtime.quantized import load_quantized_model

    artifact, _ = make(tmp_path, tiny_tokenizer, heads=4, kv_heads=2, tie=False)
    gptq = quantize(artifact, QuantizeConfig(artifact=str(artifact.path), out=str(tmp_path / "gptq"), method="gptq",
                                             group_size=32, desc_act=False, sym=False, n_samples=4, seq_len=32))
    trt = export(gptq, tmp_path, dtype="float16")
    config = json.loads((trt.path / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W4A16_GPTQ" and config["quantization"]["group_size"] == 32
    assert (trt.path / "convert.py").is_file() and not (trt.path / "rank0.safetensors").exists()
    assert "python convert.py --out checkpoint" in (trt.path / "build.sh").read_text()
    reader = Reader(trt.path)
    quantized = load_quantized_model(gptq.path)  # our loader: GPTQ weights dequantized once
    layer = quantized.model.layers[1]
    for trt_name, module in (("mlp.fc", layer.mlp.gate_proj), ("mlp.gate", layer.mlp.up_proj),
                             ("mlp.proj", layer.mlp.down_proj), ("attention.dense", layer.self_attn.o_proj)):
        ours = module.dequantized().detach().float().numpy()
        np.testing.assert_allclose(reader.weight(0, f"transformer.layers.1.{trt_name}"), ours, atol=1e-3, rtol=2e-3)
    qkv = torch.cat([layer.self_attn.q_proj.dequantized(), layer.self_attn.k_proj.dequantized(),
                     layer.self_attn.v_proj.dequantized()]).detach().float().numpy()
    np.testing.assert_allclose(reader.weight(0, "transformer.layers.1.attention.qkv"), qkv, atol=1e-3, rtol=2e-3)
    ints = load_file(trt.path / "rank0.prelayout.safetensors")["transformer.layers.1.mlp.fc.weight"]
    assert ints.dtype == np.int8 and ints.min() >= -8 and ints.max() <= 7
    with torch.no_grad():
        expected = quantized(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(reader.logits(IDS), expected, atol=5e-3, rtol=5e-3)
    two = export(gptq, tmp_path, "tp2", dtype="float16", tp_size=2)
    np.testing.assert_allclose(Reader(two.path).logits(IDS), expected, atol=5e-3, rtol=5e-3)


def test_act_order_and_ragged_groups_are_refused_with_the_fix(tmp_path, tiny_tokenizer):
    artifact, _ = make(tmp_path, tiny_tokenizer, heads=4, kv_heads=2)
    act_order = quantize(artifact, QuantizeConfig(artifact=str(artifact.path), out=str(tmp_path / "ao"),
                                                  method="gptq", group_size=32, desc_act=True, n_samples=4,
                                                  seq_len=32))
    with pytest.raises(UserError, match="desc_act.*--no-desc-act --group-size 64"):
        export(act_order, tmp_path, "x", dtype="float16")
    ragged, _ = make(tmp_path, tiny_tokenizer, name="ragged", hidden=96, heads=3, kv_heads=1, intermediate=160)
    rq = quantize(ragged, QuantizeConfig(artifact=str(ragged.path), out=str(tmp_path / "rq"), method="rtn", desc_act=False,
                                         group_size=64, n_samples=4, seq_len=32))
    with pytest.raises(UserError, match="group size 64 does not divide hidden_size 96"):
        export(rq, tmp_path, "y", dtype="float16")
    with pytest.raises(UserError, match="tp_size: 3 does not divide"):
        export(artifact, tmp_path, "z", tp_size=3)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_engine_backend_without_tensorrt_llm_says_what_to_install(tmp_path):
    try:
        import tensorrt_llm  # noqa: F401
        pytest.skip("tensorrt_llm is installed here")
    except ImportError:
        pass
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": {}, "build_config": {}}))
    (engine / "rank0.engine").write_bytes(b"")
    for args in (["runtime.generate", "--prompt", "hi"], ["runtime.serve"]):
        proc = subprocess.run([sys.executable, "-m", args[0], "--artifact", str(engine), *args[1:]],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "tensorrt-llm==1.2.1" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_model_checkpoint_reproduces_hf_logits(reference_artifact, tmp_path):
    from runtime.loading import load_model

    trt = export(reference_artifact, tmp_path)
    model = load_model(reference_artifact.path)
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282, 4649, 314]
    np.testing.assert_allclose(Reader(trt.path).logits(ids), hf_logits(model, ids), atol=2e-3, rtol=1e-3)
