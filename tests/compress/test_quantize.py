import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from compress.artifact import verify
from compress.models import load_artifact_model
from compress.quantize import QuantizeConfig, quantize
from runtime.quantized import GPTQLinear, Int8DynamicLinear
from tests.conftest import make_ragged_artifact


def independent_dequant(qweight, qzeros, scales, g_idx, bits):
    """Straight from the documented GPTQ v1 layout, with numpy bit operations, one column at a time."""
    per, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros = qweight.view(np.uint32), qzeros.view(np.uint32)
    in_f, out_f = qweight.shape[0] * per, qweight.shape[1]
    w = np.zeros((out_f, in_f), dtype=np.float32)
    for i in range(in_f):
        q = (qweight[i // per] >> np.uint32((i % per) * bits)) & np.uint32(mask)
        g = int(g_idx[i])
        z = np.stack([(qzeros[g] >> np.uint32(k * bits)) & np.uint32(mask) for k in range(per)], 1).reshape(-1)
        w[:, i] = scales[g].astype(np.float32) * (q.astype(np.float32) - (z.astype(np.float32) + 1))
    return w


@pytest.fixture()
def ragged_artifact(tmp_path, tiny_tokenizer):
    return make_ragged_artifact(tmp_path / "ragged", tiny_tokenizer, heads=4, kv_heads=2)


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "q"), n_samples=8, seq_len=64, batch_size=4)
    base.update(kw)
    return QuantizeConfig(**base)


@pytest.mark.parametrize("method,sym,desc_act,bits", [("gptq", True, False, 4), ("gptq", False, True, 4),
                                                      ("rtn", False, False, 4), ("gptq", True, False, 8)])
def test_checkpoint_matches_independent_unpacking(ragged_artifact, tmp_path, method, sym, desc_act, bits):
    cfg = _cfg(tmp_path, artifact=str(ragged_artifact.path), method=method, sym=sym, desc_act=desc_act,
               bits=bits, group_size=64)
    art = quantize(ragged_artifact, cfg)
    assert verify(art) == [] and art.manifest["parent"]["content_hash"] == ragged_artifact.content_hash
    config = json.loads((art.path / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq", bits, 64, sym, desc_act)
    tensors = load_file(str(art.path / "model.safetensors"))
    model = load_artifact_model(art.path)
    name = "model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.scales"].shape == (3, 96)  # 160 inputs = 64 + 64 + 32
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        ours = model.get_submodule(name)
        assert isinstance(ours, GPTQLinear)
        theirs = independent_dequant(*(tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), bits)
        assert np.array_equal(ours.dequantized().numpy(), theirs)
    ids = torch.randint(0, 500, (2, 16))
    ref = load_artifact_model(ragged_artifact.path)
    out, expected = model(ids).logits, ref(ids).logits
    assert torch.isfinite(out).all()
    assert ((out - expected).norm() / expected.norm()) < (0.05 if bits == 8 else 0.5)
    if method == "gptq":
        assert art.manifest["quantization"]["calibration"]["n_samples"] == 8
    assert set(art.manifest["quantization"]["layer_errors"]) >= {"model.layers.0.self_attn.q_proj"}


def test_gptq_model_error_below_rtn(ragged_artifact, tmp_path):
    ids = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(1))
    ref = load_artifact_model(ragged_artifact.path)(ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        cfg = _cfg(tmp_path, artifact=str(ragged_artifact.path), method=method, out=str(tmp_path / method),
                   n_samples=32, group_size=32)
        errs[method] = (load_artifact_model(quantize(ragged_artifact, cfg).path)(ids).logits - ref).norm()
    assert errs["gptq"] < errs["rtn"]


def test_dynamic_int8_and_casts(tiny_artifact, tmp_path):
    ids = torch.randint(0, 500, (2, 20))
    ref = load_artifact_model(tiny_artifact.path)(ids).logits
    art = quantize(tiny_artifact, _cfg(tmp_path, artifact=str(tiny_artifact.path), method="dynamic-int8",
                                       out=str(tmp_path / "int8")))
    model = load_artifact_model(art.path)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8DynamicLinear)
    assert ((model(ids).logits - ref).norm() / ref.norm()) < 0.05
    for method, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        art = quantize(tiny_artifact, _cfg(tmp_path, artifact=str(tiny_artifact.path), method=method,
                                           out=str(tmp_path / method)))
        model = load_artifact_model(art.path)
        assert next(model.parameters()).dtype == dtype
        assert ((model(ids).logits.float() - ref).norm() / ref.norm()) < 0.05


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "compress.quantize", *args], capture_output=True, text=True)


def test_invalid_settings_fail_before_work(tiny_artifact, tmp_path):
    a = ["--artifact", str(tiny_artifact.path), "--out", str(tmp_path / "x")]
    for extra, message in ((["--bits", "3"], "bits: 3 is not supported"),
                           (["--group-size", "100"], "group_size: must be a power of two"),
                           (["--group-size", "0"], "group_size: must be a power of two"),
                           (["--calibration", str(tmp_path / "none.txt")], "calibration: file not found"),
                           (["--damp", "2"], "damp: must be in (0, 1)")):
        proc = _cli(*a, *extra)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    (tmp_path / "empty.txt").write_text("")
    proc = _cli(*a, "--calibration", str(tmp_path / "empty.txt"))
    assert proc.returncode == 2 and "calibration: file is empty" in proc.stderr
    (tmp_path / "blank.jsonl").write_text('{"other": 1}\n')
    proc = _cli(*a, "--calibration", str(tmp_path / "blank.jsonl"))
    assert proc.returncode == 2 and "blank.jsonl: no text found" in proc.stderr
    assert not (tmp_path / "x").exists() and not any(p.name.startswith(".x") for p in tmp_path.iterdir())


def test_smoothing_is_exact_in_full_precision_and_helps_int8(tiny_artifact, tmp_path):
    import copy

    from compress.quantize import QuantizeConfig, smooth
    from core.family import FAMILIES

    model = load_artifact_model(tiny_artifact.path)
    with torch.no_grad():  # give one input channel a large outlier, as real LLM activations have
        model.model.layers[0].input_layernorm.weight[5] = 40.0
    ids = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    smoothed = copy.deepcopy(model)
    smooth(smoothed, ids, QuantizeConfig(out="unused", batch_size=2, smooth_alpha=0.5), FAMILIES["llama"])
    assert not torch.equal(smoothed.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(smoothed(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_dynamic_int8_with_smoothing_artifact(tiny_artifact, tmp_path):
    ids = torch.randint(0, 500, (2, 20))
    ref = load_artifact_model(tiny_artifact.path)(ids).logits
    art = quantize(tiny_artifact, _cfg(tmp_path, artifact=str(tiny_artifact.path), method="dynamic-int8",
                                       smooth_alpha=0.5, out=str(tmp_path / "int8s")))
    assert art.manifest["quantization"]["smoothing"]["alpha"] == 0.5
    out = load_artifact_model(art.path)(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.05
