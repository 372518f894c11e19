"""The pipeline on a tiny model: killed after its second step, a rerun skips what is done."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.artifact import open_artifact, verify
from compress.pipeline import PipelineConfig, resolve_steps, run_pipeline
from core.errors import UserError
from tests.conftest import make_tiny_llama


@pytest.fixture()
def recipe(tmp_path, tiny_tokenizer):
    hf = tmp_path / "hf"
    make_tiny_llama(vocab_size=len(tiny_tokenizer)).save_pretrained(hf)
    tiny_tokenizer.save_pretrained(hf)
    steps = [{"step": "reference", "model": str(hf), "out": "ref"},
             {"step": "quantize", "method": "rtn", "group_size": 32, "n_samples": 4, "seq_len": 32, "out": "rtn"},
             {"step": "export.onnx", "precision": "int4", "out": "onnx"},
             {"step": "evaluate", "artifacts": ["ref", "rtn", "onnx"], "speed": False, "seq_len": 128,
              "max_eval_tokens": 512, "out": "eval"},
             {"step": "bundle", "artifact": "onnx", "out": "onnx.tar.gz"},
             {"step": "registry", "artifacts": ["ref", "rtn", "onnx"], "alias": "champion",
              "tracking_uri": f"sqlite:///{tmp_path / 'registry.db'}"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "out"), "steps": steps}))
    return path


def run(recipe: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress.pipeline", "--config", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_pipeline_resumes_after_the_finished_steps(recipe, tmp_path):
    proc = run(recipe)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("[3/6] export.onnx") and line.rstrip().endswith("..."):
            os.kill(proc.pid, signal.SIGKILL)  # in the middle of the third step
            break
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    out = tmp_path / "out"
    assert not (out / "onnx").exists()  # nothing half-written looks whole
    made = {name: (open_artifact(out / name).manifest["created"], (out / name / "model.safetensors").stat().st_mtime_ns)
            for name in ("ref", "rtn")}  # (evaluate rewrites the manifests' metrics, not the models)
    again = run(recipe)
    log = again.communicate(timeout=600)[0]
    assert again.returncode == 0, log
    assert "[1/6] reference -> " in log and "[1/6] reference -> " + str(out / "ref") + ": skipped" in log
    assert "[2/6] quantize -> " + str(out / "rtn") + ": skipped" in log
    assert "[3/6] export.onnx -> " + str(out / "onnx") + ": done" in log
    assert {name: (open_artifact(out / name).manifest["created"], (out / name / "model.safetensors").stat().st_mtime_ns)
            for name in ("ref", "rtn")} == made
    for name in ("ref", "rtn", "onnx"):
        assert not verify(open_artifact(out / name))
    assert (out / "eval" / "report.json").is_file() and (out / "onnx.tar.gz").is_file()
    assert "ref version 1; rtn version 1; onnx version 1" in log
    assert open_artifact(out / "onnx").manifest["parent"]["content_hash"] == open_artifact(out / "rtn").content_hash


def test_a_changed_step_config_redoes_that_step(recipe, tmp_path, tiny_tokenizer):
    cfg = PipelineConfig(**yaml.safe_load(recipe.read_text()))
    cfg.steps = cfg.steps[:2]
    first = run_pipeline(cfg)
    assert [d["skipped"] for d in first] == [False, False]
    assert [d["skipped"] for d in run_pipeline(cfg)] == [True, True]
    cfg.steps[1]["group_size"] = 64
    assert [d["skipped"] for d in run_pipeline(cfg)] == [True, False]
    assert open_artifact(tmp_path / "out" / "rtn").manifest["step"]["config"]["group_size"] == 64
    # a redone input (another source model) redoes the step after it, though that step's config is the same
    other = tmp_path / "hf-other"
    make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    cfg.steps[0]["model"] = str(other)
    assert [d["skipped"] for d in run_pipeline(cfg)] == [False, False]
    rtn = open_artifact(tmp_path / "out" / "rtn")
    assert rtn.manifest["parent"]["content_hash"] == open_artifact(tmp_path / "out" / "ref").content_hash


def test_recipe_errors_name_the_step(recipe, tmp_path):
    with pytest.raises(UserError, match=r"steps\[1\] \(quantize\): unknown key 'bogus'"):
        resolve_steps(PipelineConfig(steps=[{"step": "reference", "out": "r"},
                                            {"step": "quantize", "bogus": 1, "out": "q"}]), "recipe")
    with pytest.raises(UserError, match="must be one of"):
        PipelineConfig(steps=[{"step": "compile"}]).validate()
    chained = resolve_steps(PipelineConfig(out_dir=str(tmp_path), steps=[
        {"step": "reference", "out": "r"}, {"step": "quantize", "out": "q"}, {"step": "evaluate", "out": "e"}]), "x")
    assert chained[1][1].artifact == str(tmp_path / "r") and chained[2][1].artifacts == [str(tmp_path / "q")]
    assert chained[2][1].reference == str(tmp_path / "r")
