import subprocess
import sys

import pytest
import torch

from compress.artifact import open_artifact
from compress.models import count_parameters, load_artifact_model
from compress.prune import PruneConfig, prune
from compress.sparsity import magnitude_mask, sparsegpt, wanda_mask
from compress.surgery import keep_kv_groups, keep_layers, keep_mlp_channels
from core.config import build_config
from core.errors import UserError
from core.family import FAMILIES
from tests.conftest import make_tiny_llama

IDS = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_mlp_surgery_is_exact_when_removed_channels_are_zero():
    model = make_tiny_llama(layers=2, intermediate=128)
    keep = [torch.arange(0, 128, 2), torch.arange(1, 128, 2)]
    for i, k in enumerate(keep):
        drop = torch.ones(128, dtype=torch.bool)
        drop[k] = False
        model.model.layers[i].mlp.down_proj.weight[:, drop] = 0
    small = keep_mlp_channels(model, keep, FAMILIES["llama"])
    assert small.config.intermediate_size == 64 and small.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    torch.testing.assert_close(small(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_group_surgery_is_exact_when_removed_heads_are_zero():
    model = make_tiny_llama(layers=2, heads=4, kv_heads=2)  # head_dim 16, 2 query heads per KV head
    keep = [[1], [0]]
    for i, groups in enumerate(keep):
        for g in {0, 1} - set(groups):
            cols = slice(g * 32, (g + 1) * 32)  # the 2 query heads of KV group g
            model.model.layers[i].self_attn.o_proj.weight[:, cols] = 0
    small = keep_kv_groups(model, keep, FAMILIES["llama"])
    assert (small.config.num_key_value_heads, small.config.num_attention_heads) == (1, 2)
    torch.testing.assert_close(small(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-zero number of KV heads"):
        keep_kv_groups(model, [[], []], FAMILIES["llama"])


@torch.no_grad()
def test_layer_surgery_is_exact_when_removed_layer_is_identity():
    model = make_tiny_llama(layers=3)
    model.model.layers[1].self_attn.o_proj.weight.zero_()
    model.model.layers[1].mlp.down_proj.weight.zero_()
    torch.testing.assert_close(keep_layers(model, [0, 2])(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_masks_hit_ratio_and_pattern():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x_sq = torch.rand(64) * 10
    assert 1 - magnitude_mask(w, 0.5).float().mean() == pytest.approx(0.5, abs=1 / 2048)
    assert torch.all((~wanda_mask(w, x_sq, 0.3)).sum(1) == int(64 * 0.3))
    for mask in (magnitude_mask(w, 0, (2, 4)), wanda_mask(w, x_sq, 0, (2, 4))):
        assert torch.all(mask.view(32, 16, 4).sum(-1) == 2)
    x = torch.randn(256, 64)
    h = 2 * x.t() @ x / 256
    new_w, keep = sparsegpt(w, h, 0.5)
    assert torch.all((~keep).sum(1) == 32) and torch.all(new_w[~keep] == 0)
    _, keep24 = sparsegpt(w, h, 0, (2, 4))
    assert torch.all(keep24.view(32, 16, 4).sum(-1) == 2)
    # SparseGPT's weight update makes its layer output closer than plain masking
    err_sgpt = (x @ (w - new_w).t()).norm()
    err_mask = (x @ (w - w * keep).t()).norm()
    assert err_sgpt < err_mask


def _cfg(tmp_path, art, **kw):
    values = dict(artifact=str(art.path), out=str(tmp_path / "p"), n_samples=8, seq_len=64, batch_size=4)
    values.update(kw)
    return build_config(PruneConfig, values, "test")


@pytest.mark.parametrize("method,extra", [("magnitude", {"sparsity": 0.5}), ("wanda", {"pattern": "2:4"}),
                                          ("sparsegpt", {"sparsity": 0.5})])
def test_unstructured_artifacts(tiny_artifact, tmp_path, method, extra):
    art = prune(tiny_artifact, _cfg(tmp_path, tiny_artifact, method=method, **extra))
    p = art.manifest["pruning"]
    assert art.kind == "pruned" and p["sparsity_overall"] == pytest.approx(0.5, abs=0.01)
    assert all(v == pytest.approx(0.5, abs=0.02) for v in p["sparsity_per_layer"].values())
    model = load_artifact_model(art.path)
    w = model.model.layers[0].mlp.up_proj.weight
    assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.02)


def test_structured_artifacts_shrink(tiny_artifact, tmp_path):
    before = count_parameters(load_artifact_model(tiny_artifact.path))
    art = prune(tiny_artifact, _cfg(tmp_path, tiny_artifact, method="mlp", sparsity=0.25))
    model = load_artifact_model(art.path)
    assert model.config.intermediate_size == 96 and count_parameters(model) < before
    art = prune(tiny_artifact, _cfg(tmp_path, tiny_artifact, method="layers", target_layers=1, out=str(tmp_path / "l")))
    assert load_artifact_model(art.path).config.num_hidden_layers == 1
    assert len(art.manifest["pruning"]["block_importance"]) == 2
    art = prune(tiny_artifact, _cfg(tmp_path, tiny_artifact, method="heads", sparsity=0.5, out=str(tmp_path / "h")))
    assert load_artifact_model(art.path).config.num_key_value_heads == 1


def test_recover_keeps_zeros_and_reduces_kl(tiny_artifact, tmp_path):
    cfg = _cfg(tmp_path, tiny_artifact, method="magnitude", sparsity=0.5, recover=True, max_steps=6)
    art = prune(tiny_artifact, cfg)
    assert art.kind == "pruned" and "recovered_from" in art.manifest["pruning"]
    d = art.manifest["distillation"]
    assert d["after"]["kl"] < d["before"]["kl"]
    w = load_artifact_model(art.path).model.layers[1].mlp.down_proj.weight
    assert (w == 0).float().mean() >= 0.5 - 1e-3
    assert open_artifact(tmp_path / "p.work" / "unrecovered").kind == "pruned"


def test_bad_requests_fail_with_one_line(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match=r"sparsity: must be in \[0, 1\)"):
        _cfg(tmp_path, tiny_artifact, method="wanda", sparsity=1.0)
    with pytest.raises(UserError, match="cannot remove all KV heads"):
        prune(tiny_artifact, _cfg(tmp_path, tiny_artifact, method="heads", target_kv_heads=0))
    with pytest.raises(UserError, match="pattern: need 0 < N < M"):
        _cfg(tmp_path, tiny_artifact, method="wanda", pattern="4:2")
    proc = subprocess.run([sys.executable, "-m", "compress.prune", "--artifact", str(tiny_artifact.path), "--out",
                           str(tmp_path / "x"), "--method", "lottery"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'lottery'" in proc.stderr
    assert not (tmp_path / "x").exists()
