"""Two CPU processes on the gloo backend run the same code path as multi-GPU DDP."""

import json
import subprocess
import sys

from compress.artifact import open_artifact


def test_two_process_ddp_on_cpu(tiny_artifact, tmp_path):
    # one validation window for two ranks: rank 1 validates a weight-0 placeholder (it used to crash
    # with "_Windows within local rank has zero length")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "compress.distill", "--teacher", str(tiny_artifact.path), "--out", str(out),
         "--init", "layer-drop", "--student-layers", "1", "--seq-len", "32", "--batch-size", "2", "--max-steps", "6",
         "--val-every", "3", "--val-windows", "1", "--eval-windows", "1", "--ckpt-every", "3",
         "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp.work" / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks) and ranks[0]["pid"] != ranks[1]["pid"]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 6
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])  # different data on each rank
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # identical weights after all-reduce
    art = open_artifact(out)
    assert art.kind == "distilled" and art.manifest["distillation"]["world_size"] == 2
