"""Model cards whose load snippets run, artifact files others can read, metrics that keep their protocol,
lineage that survives a copy."""

import contextlib
import io
import os
import shutil
import stat

import pytest

from compress.artifact import find_parent, lineage, load_snippet, open_artifact, record_metrics
from compress.evaluate import EvaluateConfig, evaluate
from compress.models import count_parameters, load_artifact_model
from export.onnx import OnnxExportConfig, export_onnx


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny reference, its GPTQ child and the child's ONNX export."""
    from tests.export.test_registry import reference_and_gptq_child

    old = os.umask(0o022)
    try:
        root = tmp_path_factory.mktemp("cards")
        ref, gptq = reference_and_gptq_child(root)
        onnx = export_onnx(gptq, OnnxExportConfig(artifact=str(gptq.path), out=str(root / "onnx"), precision="int4"))
        evaluate(EvaluateConfig(reference=str(ref.path), artifacts=[str(ref.path), str(gptq.path), str(onnx.path)],
                                out=str(root / "eval"), speed=False, seq_len=128))
    finally:
        os.umask(old)
    return ref, open_artifact(gptq.path), open_artifact(onnx.path)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_every_card_snippet_runs(family, which):
    artifact = family[which]
    snippet = load_snippet(artifact.manifest)
    assert snippet in (artifact.path / "README.md").read_text()  # what the card shows is what runs here
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, f"{artifact.kind}-card", "exec"), {"PATH": str(artifact.path)})
    assert printed.getvalue()  # it printed an answer (a random model answers with odd tokens)
    parent_line = [line for line in (artifact.path / "README.md").read_text().splitlines() if line.startswith("- parent")]
    assert all(str(artifact.path.parent) not in line for line in parent_line)  # named by name and hash, not path


def test_artifact_files_are_readable_by_others(family):
    for artifact in family:
        for path in [artifact.path, *artifact.path.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o044 == 0o044, (path, oct(mode))


def test_a_subset_run_never_replaces_full_protocol_metrics(family, tmp_path):
    ref = family[0]
    shutil.copytree(ref.path, tmp_path / "ref")
    copy = open_artifact(tmp_path / "ref")
    full = dict(copy.metrics["values"])
    assert copy.metrics["protocol"]["full"] and copy.metrics["protocol"]["windows"] > 1
    evaluate(EvaluateConfig(reference=str(copy.path), artifacts=[str(copy.path)], out=str(tmp_path / "e"),
                            speed=False, seq_len=128, max_eval_tokens=256))
    again = open_artifact(copy.path)
    assert again.metrics["values"] == full and again.metrics["protocol"]["full"]
    assert [h["protocol"]["full"] for h in again.manifest["metrics_history"]] == [True, False]
    assert f"{again.metrics['protocol']['tokens_scored']} scored tokens, full protocol" in (
        copy.path / "README.md").read_text()
    assert not record_metrics(again, {"perplexity": 1.0}, "x", {"full": False, "windows": 1})


def test_lineage_follows_content_hashes_after_a_copy(family, tmp_path):
    ref, gptq, onnx = family
    for artifact in family:
        shutil.copytree(artifact.path, tmp_path / artifact.path.name)
    moved = open_artifact(tmp_path / "onnx")
    assert find_parent(moved).path.resolve() == gptq.path.resolve()  # the recorded path still holds it
    shutil.move(str(tmp_path / gptq.path.name), str(tmp_path / "renamed"))
    chain = lineage(open_artifact(tmp_path / "onnx"), search=[tmp_path])
    assert [(p.content_hash if p else None) for p, _ in chain] == [gptq.content_hash, ref.content_hash]


def test_onnx_parameter_count_counts_the_tied_embedding_once(family):
    ref, _, onnx = family
    assert count_parameters(load_artifact_model(onnx.path)) == count_parameters(load_artifact_model(ref.path))
