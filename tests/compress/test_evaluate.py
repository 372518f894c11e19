import json
import math

import pytest
import torch

from compress.evaluate import EvaluateConfig, accuracy_metrics, evaluate
from core.config import build_config
from core.errors import UserError
from tests.conftest import make_tiny_llama


def test_accuracy_matches_hf_loss_and_self_kl_is_zero():
    ref = make_tiny_llama(seed=0)
    other = make_tiny_llama(seed=1)
    windows = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    res = accuracy_metrics(ref, {"ref": ref, "other": other}, windows)
    with torch.no_grad():
        losses = [ref(w[None], labels=w[None]).loss.item() for w in windows]
    assert res["ref"]["perplexity"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert res["ref"]["kl"] == 0.0 and res["ref"]["top1_agreement"] == 1.0
    assert res["other"]["kl"] > 0.0 and res["other"]["top1_agreement"] < 1.0
    assert res["other"]["tokens"] == 3 * 39


def test_kl_against_manual_formula():
    ref, other = make_tiny_llama(seed=0), make_tiny_llama(seed=2)
    window = torch.arange(30)[None] % 512
    res = accuracy_metrics(ref, {"o": other}, window)
    with torch.no_grad():
        p = torch.log_softmax(ref(window).logits[0, :-1], -1)
        q = torch.log_softmax(other(window).logits[0, :-1], -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item() / 29
    assert res["o"]["kl"] == pytest.approx(expected, rel=1e-4)


def test_config_requires_artifacts():
    with pytest.raises(UserError, match="artifacts: name at least one"):
        build_config(EvaluateConfig, {}, "command line")


def test_evaluate_end_to_end_on_tiny_artifact(tiny_artifact, tmp_path):
    cfg = EvaluateConfig(reference=str(tiny_artifact.path), artifacts=[str(tiny_artifact.path)],
                         out=str(tmp_path / "eval"), max_eval_tokens=1024, seq_len=256, new_tokens=4,
                         threads=1)
    report = evaluate(cfg)
    row = report["results"][0]
    assert report["protocol"]["windows"] == 4 and row["kl"] == 0.0
    assert row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b8"] > 0 and row["peak_rss_mb"] > 0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["results"][0]["perplexity"] == row["perplexity"]
    assert (tmp_path / "eval" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tiny-ref | reference |" in (tmp_path / "eval" / "report.md").read_text()
    manifest = json.loads((tiny_artifact.path / "shrinkwrap.json").read_text())
    assert manifest["metrics"]["values"]["perplexity"] == row["perplexity"]


def test_evaluate_refuses_damaged_artifact(tiny_artifact, tmp_path):
    (tiny_artifact.path / "config.json").write_text("{}")
    cfg = EvaluateConfig(reference=str(tiny_artifact.path), artifacts=[str(tiny_artifact.path)],
                         out=str(tmp_path / "eval"))
    with pytest.raises(UserError, match="damaged artifact.*config.json"):
        evaluate(cfg)


def test_peak_rss_is_the_childs_own():
    import subprocess
    import sys

    big = bytearray(1200 * 2**20)  # the parent's peak is at least 1.2 GB
    big[::4096] = b"x" * len(big[::4096])
    out = subprocess.run([sys.executable, "-c", "from compress.speed import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True)
    assert float(out.stdout) < 800
