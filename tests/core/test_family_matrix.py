"""Every step on a tiny random-init model of every family: it does what it promises, or refuses in one
line before any work (`core.family.STEP_SUPPORT`). Outcomes go to artifacts/family_matrix.json, which
`python -m core.family_matrix` turns into the README's table."""

import copy
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from compress.artifact import verify
from compress.distill import DistillConfig, distill
from compress.models import load_artifact_model
from compress.prune import PruneConfig, prune
from compress.quantize import QuantizeConfig, quantize
from compress.reference import ReferenceConfig, make_reference
from core.config import build_config
from core.errors import UserError
from core.family import FAMILIES, STEPS, supported
from export.onnx import OnnxExportConfig, export_onnx
from export.tensorrt_llm import TrtllmExportConfig, export_trtllm
from runtime.engine import Engine, SamplingParams
from runtime.onnx_backend import OnnxDecoder
from runtime.static_decode import StaticDecoder
from tests.compress.test_quantize import independent_dequant
from tests.conftest import FAMILY_EXTRAS, greedy_reference, make_tiny_family
from tests.runtime.server_helpers import running_server

OUTCOMES: dict[str, dict[str, str]] = {}
GEN = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(3, 500, (n,), generator=GEN).tolist() for n in (5, 13, 9)]  # cross the windows of 6
IDS = torch.randint(3, 500, (2, 24), generator=GEN)
CALIB = dict(n_samples=4, seq_len=32, batch_size=2)


@pytest.fixture(scope="module", params=list(FAMILY_EXTRAS))
def family_ref(request, tmp_path_factory, tiny_tokenizer):
    """A family's tiny model saved as a local HF folder, made into a reference artifact by the real step."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = make_tiny_family(model_type)
    model.save_pretrained(root / "hf")
    tiny_tokenizer.save_pretrained(root / "hf")
    ref = make_reference(ReferenceConfig(out=str(root / "reference"), model=str(root / "hf")))
    assert verify(ref) == []
    return model_type, model, ref, root


def _record(model_type: str, step: str, outcome: str) -> None:
    OUTCOMES.setdefault(model_type, {})[step] = outcome


def _run(model_type: str, step: str, out: Path, work) -> None:
    """Run `work` if the table supports the pair, else check the one-line refusal and that nothing was written."""
    reason = supported({"model_type": model_type}, step)
    if reason is None:
        work()
        _record(model_type, step, "works")
        return
    with pytest.raises(UserError) as err:
        work()
    message = str(err.value)
    assert "\n" not in message and model_type in message and step in message, message
    assert not out.exists()
    _record(model_type, step, "refused: " + reason)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def test_reference_loads_in_transformers_unchanged(family_ref):
    model_type, model, ref, _ = family_ref
    loaded = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-5, atol=1e-5)
    _record(model_type, "reference", "works")


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_gptq_checkpoint_dequantizes_independently_to_our_weights(family_ref, method):
    model_type, model, ref, root = family_ref
    out = root / method

    def work():
        art = quantize(ref, QuantizeConfig(artifact=str(ref.path), out=str(out), method=method, group_size=32,
                                           desc_act=False, **CALIB))
        ours = load_artifact_model(art.path)
        tensors = load_file(str(art.path / "model.safetensors"))
        prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
        assert len(prefixes) == len(FAMILIES[model_type].linear_names) * model.config.num_hidden_layers
        expected = copy.deepcopy(model)
        with torch.no_grad():
            for name in prefixes:
                w = independent_dequant(*(tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx")),
                                        4)
                np.testing.assert_allclose(ours.get_submodule(name).dequantized().numpy(), w, rtol=1e-6, atol=1e-6)
                expected.get_submodule(name).weight.copy_(torch.from_numpy(w))
            params = expected.state_dict()
            for key, value in tensors.items():  # the rest (norms, embeddings, biases) at the checkpoint's fp16
                if key in params:
                    params[key].copy_(torch.from_numpy(value).float())
        torch.testing.assert_close(_logits(ours), _logits(expected), rtol=1e-4, atol=1e-4)
    _run(model_type, f"quantize.{method}", out, work)


def test_dynamic_int8_stays_close(family_ref):
    model_type, model, ref, root = family_ref
    out = root / "int8"

    def work():
        art = quantize(ref, QuantizeConfig(artifact=str(ref.path), out=str(out), method="dynamic-int8", **CALIB))
        rel = (_logits(load_artifact_model(art.path)) - _logits(model)).norm() / _logits(model).norm()
        assert rel < 0.05, f"int8 logits moved by {rel:.3f}"
    _run(model_type, "quantize.dynamic-int8", out, work)


def _masked(model, method: str, info: dict):
    """The original model with what the pruning removed zeroed out (must compute what the pruned one does)."""
    family = FAMILIES[model.config.model_type]
    masked = copy.deepcopy(model)
    cfg = model.config
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            out, down = layer.get_submodule(family.out_proj), layer.get_submodule(family.down_proj)
            if method == "layers" and i not in info["kept_layers"]:
                out.weight.zero_()  # a layer whose attention and MLP add nothing is the identity
                down.weight.zero_()
            if method == "mlp":
                dropped = torch.ones(cfg.intermediate_size, dtype=torch.bool)
                dropped[info["kept_mlp_channels"][i]] = False
                down.weight[:, dropped] = 0
            if method == "heads":
                per = cfg.num_attention_heads // cfg.num_key_value_heads
                dim = out.weight.shape[1] // cfg.num_attention_heads
                for g in set(range(cfg.num_key_value_heads)) - set(info["kept_kv_heads"][i]):
                    out.weight[:, g * per * dim:(g + 1) * per * dim] = 0
    return masked


@pytest.mark.parametrize("method,target", [("layers", {"target_layers": 2}), ("mlp", {"target_intermediate": 96}),
                                           ("heads", {"target_kv_heads": 1})])
def test_structured_pruning_equals_the_masked_original(family_ref, method, target):
    model_type, model, ref, root = family_ref
    out = root / f"pruned-{method}"

    def work():
        art = prune(ref, PruneConfig(artifact=str(ref.path), out=str(out), method=method, **target, **CALIB))
        pruned = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32)
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
        masked = _masked(model, method, art.manifest["pruning"])
        torch.testing.assert_close(_logits(pruned), _logits(masked), rtol=1e-4, atol=1e-4)
    _run(model_type, f"prune.{method}", out, work)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_unstructured_pruning_reaches_its_sparsity(family_ref, method):
    model_type, model, ref, root = family_ref
    out = root / f"pruned-{method}"

    def work():
        art = prune(ref, PruneConfig(artifact=str(ref.path), out=str(out), method=method, sparsity=0.5, **CALIB))
        pruned = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32)
        for name in FAMILIES[model_type].linear_names:
            w = pruned.model.layers[1].get_submodule(name).weight
            assert (w == 0).float().mean() >= 0.49, name
    _run(model_type, f"prune.{method}", out, work)


def test_distill_writes_a_student_transformers_loads(family_ref):
    model_type, _, ref, root = family_ref
    out = root / "student"

    def work():
        cfg = build_config(DistillConfig, dict(teacher=str(ref.path), out=str(out), student_layers=2, seq_len=32,
                                               batch_size=2, max_steps=2, warmup_steps=1, val_every=2, val_windows=1,
                                               eval_windows=1, ckpt_every=2, accelerator="cpu"), "test")
        art = distill(cfg)
        student = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32)
        assert student.config.model_type == model_type and student.config.num_hidden_layers == 2
    _run(model_type, "distill", out, work)


def test_onnx_logits_with_cache_equal_transformers(family_ref):
    model_type, model, ref, root = family_ref
    out = root / "onnx"

    def work():
        art = export_onnx(ref, OnnxExportConfig(artifact=str(ref.path), out=str(out)))
        ids = IDS[:1]
        decoder = OnnxDecoder(art.path, threads=1)
        cache = decoder.new_cache(1, 32)
        got = [decoder.forward(ids[:, :10].numpy(), cache, 0)[0]]
        got += [decoder.forward(ids[:, p:p + 1].numpy(), cache, p)[0] for p in range(10, ids.shape[1])]
        np.testing.assert_allclose(np.concatenate(got), _logits(model, ids)[0].numpy(), rtol=1e-4, atol=1e-4)
    _run(model_type, "export.onnx", out, work)


def test_tensorrt_llm_checkpoint_or_refusal(family_ref):
    model_type, _, ref, root = family_ref
    out = root / "trtllm"

    def work():
        art = export_trtllm(ref, TrtllmExportConfig(artifact=str(ref.path), out=str(out)))
        assert json.loads((art.path / "config.json").read_text())["architecture"] == "LlamaForCausalLM"
    _run(model_type, "export.tensorrt_llm", out, work)


def test_paged_engine_greedy_equals_transformers(family_ref):
    model_type, model, _, root = family_ref

    def work():
        outputs, _ = Engine(model, block_size=4, num_blocks=64).generate(PROMPTS, SamplingParams(max_new_tokens=12))
        assert outputs == [greedy_reference(model, p, 12) for p in PROMPTS]
    _run(model_type, "generate.paged", root / "none", work)


def test_static_decoder_greedy_equals_transformers(family_ref):
    model_type, model, _, root = family_ref

    def work():
        try:
            static = StaticDecoder(model, max_batch=4, max_len=48)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        assert static.generate(PROMPTS, 12) == [greedy_reference(model, p, 12) for p in PROMPTS]
    _run(model_type, "generate.static", root / "none", work)


def test_server_answers_with_the_greedy_continuation(family_ref, tiny_tokenizer):
    model_type, model, ref, root = family_ref

    def work():
        with running_server(str(ref.path), model_name="m", max_model_len=64) as (url, _):
            body = {"model": "m", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "logprobs": 0}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        expected = greedy_reference(model, PROMPTS[1], 8)
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected  # the server stops at EOS
        ids = torch.tensor([PROMPTS[1] + expected])
        logprobs = torch.log_softmax(_logits(model, ids)[0, len(PROMPTS[1]) - 1:-1], -1)
        want = logprobs.gather(1, torch.tensor(expected)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(reply["logprobs"]["token_logprobs"]), want, rtol=1e-4, atol=1e-4)
        assert tiny_tokenizer.decode(expected).startswith(reply["text"]) and reply["text"]
    _run(model_type, "serve", root / "none", work)


def test_every_pair_was_checked_and_written_for_the_readme():
    """Runs last in this module: the matrix file the README table is generated from."""
    missing = [(f, s) for f in FAMILY_EXTRAS for s in STEPS if s not in OUTCOMES.get(f, {})]
    if missing:
        pytest.skip(f"run the whole module to write the matrix ({len(missing)} pairs not run)")
    import bench.family_matrix as table

    matrix = {f: {s: OUTCOMES[f][s] for s in STEPS} for f in FAMILY_EXTRAS}
    table.MATRIX.parent.mkdir(exist_ok=True)
    table.MATRIX.write_text(json.dumps(matrix, indent=1) + "\n")
    readme = table.README.read_text(encoding="utf-8")
    assert table.updated_readme(matrix, readme) == readme, "README's family matrix is stale: run make matrix"
