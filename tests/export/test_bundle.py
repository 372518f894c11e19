"""The hand-off bundle: unpacked in a clean folder, its checksums and its DEPLOY.md commands work."""

import re
import shutil
import subprocess
import sys
import tarfile
import time

import httpx
import pytest

from compress.evaluate import EvaluateConfig, evaluate
from export.bundle import BundleConfig, bundle
from runtime.bench import free_port


def unpack(tarball, into):
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    (root,) = list(into.iterdir())
    return root


def runtime_commands(deploy: str) -> list[str]:
    return [line for line in deploy.splitlines() if line.startswith("python -m runtime.")]


def test_bundle_unpacks_verifies_and_runs_its_own_commands(tiny_artifact, tmp_path):
    evaluate(EvaluateConfig(reference=str(tiny_artifact.path), artifacts=[str(tiny_artifact.path)],
                            out=str(tmp_path / "eval"), speed=False, seq_len=128, max_eval_tokens=512))
    out = bundle(BundleConfig(artifact=str(tiny_artifact.path), out=str(tmp_path / "hand-off.tar.gz")))
    root = unpack(out, tmp_path / "clean")
    assert {p.name for p in root.iterdir()} == {"artifact", "eval", "DEPLOY.md", "SHA256SUMS", "BUNDLE.json"}  # no parents
    assert (root / "eval" / "report.md").is_file() and (root / "eval" / "pareto.png").is_file()
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=root, capture_output=True, text=True)
    assert check.returncode == 0 and "FAILED" not in check.stdout
    deploy = (root / "DEPLOY.md").read_text()
    assert "held-out perplexity" in deploy and "vllm serve ./artifact" in deploy
    generate, serve = runtime_commands(deploy)
    python = f"{sys.executable} "  # `python` in the documented commands is this environment's interpreter
    done = subprocess.run(generate.replace("python ", python, 1), shell=True, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "decode" in done.stdout, done.stderr
    port = free_port()
    server = subprocess.Popen(re.sub(r"--port \d+", f"--port {port}", serve).replace("python ", python, 1).split(),
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the DEPLOY.md server command exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert answer.status_code == 200
    finally:
        server.terminate()
        server.wait(30)
    # a changed byte after unpacking is caught by the checksums
    data = (root / "artifact" / "model.safetensors").read_bytes()
    (root / "artifact" / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root, capture_output=True).returncode != 0


def test_bad_input_writes_nothing(tiny_artifact, tmp_path):
    cli = [sys.executable, "-m", "export.bundle", "--artifact"]
    not_artifact = subprocess.run([*cli, str(tmp_path), "--out", str(tmp_path / "a.tar.gz")], capture_output=True,
                                  text=True)
    assert not_artifact.returncode == 2 and not (tmp_path / "a.tar.gz").exists()
    existing = tmp_path / "b.tar.gz"
    existing.write_text("keep")
    refused = subprocess.run([*cli, str(tiny_artifact.path), "--out", str(existing)], capture_output=True, text=True)
    assert refused.returncode == 2 and "already exists" in refused.stderr and existing.read_text() == "keep"
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact.path, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    tampered = subprocess.run([*cli, str(copy), "--out", str(tmp_path / "c.tar.gz")], capture_output=True, text=True)
    assert tampered.returncode == 2 and "config.json" in tampered.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar.gz", "copy", "tiny-ref"]


@pytest.mark.slow
def test_deploy_command_on_the_real_model_answers_paris(reference_artifact, tmp_path):
    out = bundle(BundleConfig(artifact=str(reference_artifact.path), out=str(tmp_path / "ref.tar.gz")))
    root = unpack(out, tmp_path / "clean")
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=root).returncode == 0
    generate = runtime_commands((root / "DEPLOY.md").read_text())[0]
    # the documented command, as a shell runs it (`python` is this environment's interpreter)
    done = subprocess.run(generate.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
