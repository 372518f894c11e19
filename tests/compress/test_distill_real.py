"""The smoke recipe on the real teacher (slow)."""

import subprocess
import sys

import pytest

from compress.artifact import open_artifact

pytestmark = pytest.mark.slow


def test_smoke_recipe_on_real_teacher(reference_artifact, tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "compress.distill", "--config", "configs/distill/smoke.yaml",
                           "--teacher", str(reference_artifact.path), "--out", str(out), "--max-steps", "6",
                           "--accelerator", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    art = open_artifact(out)
    d = art.manifest["distillation"]
    assert art.kind == "distilled" and d["steps"] == 6
    assert d["after"]["kl"] < d["before"]["kl"]
    assert art.manifest["parent"]["content_hash"] == reference_artifact.content_hash
