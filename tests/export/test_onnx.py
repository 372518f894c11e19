import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compress.artifact import verify
from compress.models import load_artifact_model
from compress.quantize import QuantizeConfig, quantize
from core.errors import UserError
from export.onnx import OnnxExportConfig, export_onnx
from runtime.engine import SamplingParams
from runtime.onnx_backend import OnnxDecoder, OnnxEngine
from tests.conftest import greedy_reference, make_ragged_artifact


def _export(artifact, tmp_path, name="onnx", **kw):
    return export_onnx(artifact, OnnxExportConfig(artifact=str(artifact.path), out=str(tmp_path / name), **kw))


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def matmulnbits_weights(onnx_path) -> dict[str, np.ndarray]:
    """Dequantize every MatMulNBits of a graph independently: (N, K) weights in the input's own order."""
    model = onnx.load(str(onnx_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    perms = {node.output[0]: inits[node.input[1]] for node in model.graph.node if node.op_type == "Gather"
             and node.input[1] in inits and node.input[1].endswith("act_order_perm")}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        q = _unpack_nibbles(inits[node.input[1]]).reshape(n, -1)[:, :k].astype(np.float32)
        scales = inits[node.input[2]].reshape(n, -1)
        zeros = _unpack_nibbles(inits[node.input[3]]).reshape(n, -1)[:, : scales.shape[1]].astype(np.float32)
        group = np.arange(k) // block
        w = (q - zeros[:, group]) * scales[:, group]
        perm = perms.get(node.input[0])
        if perm is not None:  # column j of w belongs to input channel perm[j]
            restored = np.empty_like(w)
            restored[:, perm] = w
            w = restored
        out[node.name] = w
    return out


@pytest.fixture()
def ragged_artifact(tmp_path, tiny_tokenizer):
    return make_ragged_artifact(tmp_path / "ragged", tiny_tokenizer, heads=3, kv_heads=1)  # head size 32


def test_fp32_export_round_trips_with_cache(tiny_artifact, tmp_path):
    art = _export(tiny_artifact, tmp_path)
    assert art.kind == "onnx" and verify(art) == []
    assert art.manifest["parent"]["content_hash"] == tiny_artifact.content_hash
    ref = load_artifact_model(tiny_artifact.path)
    ids = torch.randint(3, 500, (1, 24))
    with torch.no_grad():
        expected = ref(ids).logits[0].numpy()
    decoder = OnnxDecoder(art.path, threads=1)
    cache = decoder.new_cache(1, 32)
    got = [decoder.forward(ids[:, :10].numpy(), cache, 0)[0]]  # prompt, then one token at a time
    for pos in range(10, 24):
        got.append(decoder.forward(ids[:, pos:pos + 1].numpy(), cache, pos)[0])
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-4, rtol=1e-4)
    # prefill of the last position only (logits_to_keep = 1): the same row, one row computed
    assert decoder.keeps_logits
    last = decoder.forward(ids[:, :10].numpy(), decoder.new_cache(1, 32), 0, last_only=True)
    assert last.shape == (1, 1, expected.shape[-1])
    np.testing.assert_allclose(last[0, 0], expected[9], atol=1e-4, rtol=1e-4)


def test_fp32_engine_greedy_equals_pytorch(tiny_artifact, tmp_path):
    art = _export(tiny_artifact, tmp_path)
    ref = load_artifact_model(tiny_artifact.path)
    prompt = torch.randint(3, 500, (1, 7))
    (out,), stats = OnnxEngine(art.path, threads=1).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=12))
    assert out == greedy_reference(ref, prompt[0].tolist(), 12) and stats.new_tokens == 12


@pytest.mark.parametrize("desc_act", [True, False])
def test_gptq_int4_export_carries_the_gptq_weights(ragged_artifact, tmp_path, desc_act):
    qcfg = QuantizeConfig(artifact=str(ragged_artifact.path), out=str(tmp_path / "gptq"), method="gptq", bits=4,
                          group_size=64, sym=False, desc_act=desc_act, n_samples=8, seq_len=64, batch_size=4)
    gptq = quantize(ragged_artifact, qcfg)
    art = _export(gptq, tmp_path, precision="int4", accuracy_level=0)
    assert "GPTQ integers" in art.manifest["onnx"]["weights"]
    with pytest.raises(UserError, match="GPTQ artifact"):
        _export(gptq, tmp_path, name="fp32", precision="fp32")
    with pytest.raises(UserError, match="group size"):
        _export(gptq, tmp_path, name="b32", precision="int4", block_size=32)
    weights = matmulnbits_weights(art.path / "model.onnx")
    torch_model = load_artifact_model(gptq.path)
    checked = 0
    for layer in range(2):
        pieces = {"attn/qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                  "mlp/down_proj": ["mlp.down_proj"], "mlp/gate_proj": ["mlp.gate_proj"]}
        for key, names in pieces.items():
            node = next(n for n in weights if n.startswith(f"/model/layers.{layer}/{key}/"))
            expected = np.concatenate([torch_model.model.layers[layer].get_submodule(m).dequantized().numpy()
                                       for m in names])
            assert np.array_equal(weights[node], expected), node
            checked += 1
    assert checked == 6
    has_gather = any(n.op_type == "Gather" and n.name.endswith("ActOrderGather")
                     for n in onnx.load(str(art.path / "model.onnx"), load_external_data=False).graph.node)
    assert has_gather == desc_act
    ids = torch.randint(3, 500, (1, 20))
    with torch.no_grad():
        expected_logits = torch_model(ids).logits[0].numpy()
    got = OnnxDecoder(art.path, threads=1).window_logits(ids.numpy())[0]
    np.testing.assert_allclose(got, expected_logits, atol=2e-3, rtol=1e-3)


def test_gptq_calibrated_lm_head_beats_the_builders_rtn_head(ragged_artifact, tmp_path):
    from compress.calibration import CalibrationFlags, calibration_windows
    from compress.models import load_tokenizer

    qcfg = QuantizeConfig(artifact=str(ragged_artifact.path), out=str(tmp_path / "gptq"), method="gptq", bits=4,
                          group_size=32, sym=False, desc_act=False, n_samples=8, seq_len=64, batch_size=4)
    gptq = quantize(ragged_artifact, qcfg)
    rtn_head = _export(gptq, tmp_path, name="rtn-head", precision="int4", lm_head="int4", accuracy_level=0)
    gptq_head = _export(gptq, tmp_path, name="gptq-head", precision="int4", lm_head="int4-gptq", accuracy_level=0)
    assert "LM head GPTQ int4" in gptq_head.manifest["onnx"]["weights"]
    heads = {name: next(w for node, w in matmulnbits_weights(art.path / "model.onnx").items()
                        if node.startswith("/lm_head/"))
             for name, art in (("rtn", rtn_head), ("gptq", gptq_head))}
    torch_model = load_artifact_model(gptq.path)
    float_head = torch_model.lm_head.weight.detach().numpy()
    assert heads["gptq"].shape == float_head.shape
    # output error on held-out windows of the body's real hidden states: GPTQ's objective
    windows, _ = calibration_windows(CalibrationFlags(n_samples=8, seq_len=64, seed=123), load_tokenizer(gptq.path))
    with torch.no_grad():
        hidden = torch_model.model(windows).last_hidden_state.reshape(-1, float_head.shape[1]).numpy()
    error = {name: np.linalg.norm(hidden @ (w - float_head).T) for name, w in heads.items()}
    assert error["gptq"] < 0.9 * error["rtn"], error  # 15% lower here; an RTN head would tie
    with pytest.raises(UserError, match="int4-gptq calibrates the head of a GPTQ artifact"):
        _export(ragged_artifact, tmp_path, name="nope", precision="int4", lm_head="int4-gptq")


def test_int4_and_int8_from_float(tiny_artifact, tmp_path):
    ref = load_artifact_model(tiny_artifact.path)
    ids = torch.randint(3, 500, (1, 16))
    with torch.no_grad():
        expected = ref(ids).logits[0].numpy()
    for name, kw in {"int4": dict(precision="int4"), "int8w": dict(precision="int8"),
                     "int8d": dict(precision="int8", int8_method="dynamic")}.items():
        art = _export(tiny_artifact, tmp_path, name=name, **kw)
        info = art.manifest["onnx"]
        assert info["precision"] == kw["precision"]
        assert ("quantize_dynamic" in info["weights"]) == (name == "int8d")
        assert name != "int4" or "builder quantizer" in info["weights"]
        got = OnnxDecoder(art.path, threads=1).window_logits(ids.numpy())[0]
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert 0 < rel < (0.3 if name == "int4" else 0.1), (name, rel)


def test_bad_inputs_fail_in_one_line(tiny_artifact, tmp_path):
    art = _export(tiny_artifact, tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in art.path.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "model.onnx").write_bytes((art.path / "model.onnx").read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="model.onnx: cannot load ONNX model"):
        OnnxDecoder(broken)
    proc = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifact", str(broken), "--prompt", "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.onnx" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "export.onnx", "--artifact", str(tiny_artifact.path), "--out",
                           str(tmp_path / "x"), "--precision", "int2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "precision" in proc.stderr and not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="block_size"):
        OnnxExportConfig(artifact=str(tiny_artifact.path), out=str(tmp_path / "y"), block_size=48).validate()
