import json
import shutil
import subprocess
import sys

import pytest

from compress.artifact import MANIFEST, open_artifact, record_metrics, verify, write_artifact
from compress.inspect import inspect_artifact
from core.errors import UserError


def _write(path, parent=None, payload=b"weights"):
    with write_artifact(path, "quantized" if parent else "reference", "tests", {"k": 1}, parent=parent) as tmp:
        (tmp / "model.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    return open_artifact(path)


def test_manifest_fields_and_card(tmp_path):
    art = _write(tmp_path / "a")
    m = art.manifest
    assert m["kind"] == "reference" and m["step"]["config"] == {"k": 1}
    assert {f["path"] for f in m["files"]} == {"model.bin", "sub/x.txt"}
    assert all(len(f["sha256"]) == 64 for f in m["files"])
    assert "torch" in m["libraries"] and m["created"]
    assert (tmp_path / "a" / "README.md").read_text().startswith("# a")
    assert verify(art) == []


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), write_artifact(tmp_path / "b", "reference", "tests", {}) as tmp:
        (tmp / "model.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    _write(tmp_path / "a")
    with pytest.raises(UserError, match="already exists"):
        _write(tmp_path / "a")
    with write_artifact(tmp_path / "a", "reference", "tests", {}, overwrite=True) as tmp:
        (tmp / "model.bin").write_bytes(b"new")
    assert open_artifact(tmp_path / "a").manifest["files"][0]["size"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_verify_detects_flipped_byte_and_missing_file(tmp_path):
    art = _write(tmp_path / "a")
    data = bytearray((tmp_path / "a" / "model.bin").read_bytes())
    data[3] ^= 0x01
    (tmp_path / "a" / "model.bin").write_bytes(bytes(data))
    problems = verify(art)
    assert len(problems) == 1 and "model.bin" in problems[0] and "sha256" in problems[0]
    (tmp_path / "a" / "sub" / "x.txt").unlink()
    assert any("x.txt: missing" in p for p in verify(art))


def test_lineage_and_parent_hash(tmp_path):
    parent = _write(tmp_path / "p")
    child = _write(tmp_path / "c", parent=parent)
    assert child.manifest["parent"]["content_hash"] == parent.content_hash
    report, problems = inspect_artifact(str(tmp_path / "c"))
    assert problems == [] and "hash ok" in report
    (tmp_path / "p" / "model.bin").write_bytes(b"changed")
    report, problems = inspect_artifact(str(tmp_path / "c"))
    assert problems == [] and "damaged:" in report and "model.bin" in report
    shutil.rmtree(tmp_path / "p")
    _write(tmp_path / "p", payload=b"other weights")
    report, _ = inspect_artifact(str(tmp_path / "c"))
    assert "content hash changed" in report


def test_record_metrics_keeps_identity(tmp_path):
    art = _write(tmp_path / "a")
    before = art.content_hash
    record_metrics(art, {"perplexity": 31.5}, "python -m compress.evaluate")
    again = open_artifact(tmp_path / "a")
    assert again.content_hash == before and verify(again) == []
    assert again.metrics["values"]["perplexity"] == 31.5
    assert "31.5" in (tmp_path / "a" / "README.md").read_text()


def test_inspect_cli_exit_codes(tmp_path):
    _write(tmp_path / "a")
    ok = subprocess.run([sys.executable, "-m", "compress.inspect", str(tmp_path / "a")], capture_output=True, text=True)
    assert ok.returncode == 0 and "integrity: ok" in ok.stdout
    (tmp_path / "a" / "model.bin").write_bytes(b"weightz")
    bad = subprocess.run([sys.executable, "-m", "compress.inspect", str(tmp_path / "a")], capture_output=True, text=True)
    assert bad.returncode == 1 and "model.bin" in bad.stderr
    none = subprocess.run([sys.executable, "-m", "compress.inspect", str(tmp_path / "nope")], capture_output=True,
                          text=True)
    assert none.returncode == 2 and none.stderr.strip() == f"error: artifact not found: {tmp_path / 'nope'}"


def test_broken_manifest_is_one_line_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        open_artifact(tmp_path / "a")
    (tmp_path / "a" / MANIFEST).write_text(json.dumps({"kind": "reference"}))
    with pytest.raises(UserError, match="field 'files' is missing"):
        open_artifact(tmp_path / "a")
