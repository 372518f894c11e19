"""The registry against a real MLflow tracking server on loopback, and against the embedded SQLite default."""

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from compress.artifact import sha256_file
from compress.quantize import QuantizeConfig, quantize
from core.errors import UserError
from export.registry import ListConfig, PullConfig, PushConfig, list_versions, pull, push
from runtime.bench import free_port

pytest.importorskip("mlflow")


@contextlib.contextmanager
def mlflow_server(root: Path, port: int | None = None):
    """`mlflow server` with a SQLite backend store and a local artifact root; stopped at the end."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "store"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, "mlflow server exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)
        yield url, port
    finally:
        proc.terminate()
        proc.wait(30)


def reference_and_gptq_child(root: Path):
    """A tiny reference and its GPTQ child (group 32) under `root`."""
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer, save_reference

    tokenizer = make_tiny_tokenizer()
    ref = save_reference(root / "tiny-ref", make_tiny_llama(vocab_size=len(tokenizer)), tokenizer)
    child = quantize(ref, QuantizeConfig(artifact=str(ref.path), out=str(root / "tiny-gptq"), method="gptq",
                                         group_size=32, n_samples=4, seq_len=32))
    return ref, child


@pytest.fixture(scope="module")
def lineage_pair(tmp_path_factory):
    return reference_and_gptq_child(tmp_path_factory.mktemp("registry"))


def files_of(artifact_path: Path) -> dict[str, str]:
    return {p.relative_to(artifact_path).as_posix(): sha256_file(p) for p in artifact_path.rglob("*") if p.is_file()}


def test_push_pull_list_with_lineage_on_a_tracking_server(lineage_pair, tmp_path):
    ref, child = lineage_pair
    with mlflow_server(tmp_path / "server") as (url, _):
        first = push(PushConfig(artifact=str(ref.path), name="tiny", tracking_uri=url, alias="champion"))
        assert first.created and first.version == "1"
        again = push(PushConfig(artifact=str(ref.path), name="tiny", tracking_uri=url))
        assert not again.created and again.version == "1"  # same content: no second version
        q = push(PushConfig(artifact=str(child.path), name="tiny-gptq", tracking_uri=url, tag=["owner=tests"]))
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=url, registry_uri=url)
        version = client.get_model_version("tiny-gptq", q.version)
        assert version.tags["parent_model"] == "tiny" and version.tags["parent_version"] == "1"
        assert version.tags["kind"] == "quantized" and version.tags["content_hash"] == child.content_hash
        assert version.tags["owner"] == "tests" and version.source.startswith("runs:/")
        run = client.get_run(version.run_id)
        assert run.data.params["method"] == "gptq" and run.data.params["group_size"] == "32"
        assert run.data.tags["shrinkwrap.parent_content_hash"] == ref.content_hash
        assert len(client.search_model_versions("name='tiny'")) == 1
        # the alias resolves, and the pull is byte-identical and verified
        pulled = pull(PullConfig(model_uri="models:/tiny@champion", out=str(tmp_path / "pulled"), tracking_uri=url))
        assert pulled.content_hash == ref.content_hash and files_of(pulled.path) == files_of(ref.path)
        pulled_child = pull(PullConfig(model_uri=f"models:/tiny-gptq/{q.version}", out=str(tmp_path / "pc"),
                                       tracking_uri=url))
        # lineage by content hash survives the copy: the pulled child finds the pulled parent beside it
        from compress.artifact import find_parent

        assert find_parent(pulled_child).path.resolve() in {pulled.path.resolve(), ref.path.resolve()}
        rows = list_versions(ListConfig(tracking_uri=url))
        assert [(r["name"], r["version"], r["aliases"], r["parent"]) for r in rows] == [
            ("tiny", "1", ["champion"], "–"), ("tiny-gptq", q.version, [], "tiny/1")]
        # a changed byte in the store: refused, naming the file, and nothing left at --out
        run_id = client.get_model_version("tiny", "1").run_id
        stored = next(p for p in (tmp_path / "server" / "store").rglob("model.safetensors") if run_id in str(p))
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
        out = tmp_path / "tampered"
        proc = subprocess.run([sys.executable, "-m", "export.registry", "pull", "--model-uri", "models:/tiny/1",
                               "--out", str(out), "--tracking-uri", url], capture_output=True, text=True)
        assert proc.returncode == 1 and "model.safetensors" in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".tampered*"))


def test_a_registry_that_is_down_fails_in_one_line_and_registers_nothing(lineage_pair, tmp_path):
    ref, child = lineage_pair
    port = free_port()
    with mlflow_server(tmp_path / "server", port) as (url, _):
        push(PushConfig(artifact=str(ref.path), name="tiny", tracking_uri=url))
    proc = subprocess.run([sys.executable, "-m", "export.registry", "push", "--artifact", str(child.path),
                           "--name", "tiny-gptq", "--tracking-uri", url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not reachable" in proc.stderr
    rows = list_versions(ListConfig(tracking_uri=f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"))  # its store
    assert [(r["name"], r["version"]) for r in rows] == [("tiny", "1")]


def test_embedded_sqlite_registry_is_the_default(lineage_pair, tmp_path, monkeypatch):
    ref, child = lineage_pair
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = [sys.executable, "-m", "export.registry"]
    cwd = {"cwd": tmp_path, "capture_output": True, "text": True}
    for art, name in ((ref, "tiny"), (child, "tiny-gptq")):
        proc = subprocess.run([*run, "push", "--artifact", str(art.path), "--name", name, "--alias", "champion"], **cwd)
        assert proc.returncode == 0 and "version 1" in proc.stdout, proc.stderr
    assert (tmp_path / "artifacts" / "registry" / "mlflow.db").is_file()
    listed = subprocess.run([*run, "list"], **cwd).stdout
    assert "| tiny-gptq | 1 | champion | quantized |" in listed and "tiny/1" in listed
    proc = subprocess.run([*run, "pull", "--model-uri", "models:/tiny-gptq@champion", "--out", "got"], **cwd)
    assert proc.returncode == 0 and files_of(tmp_path / "got") == files_of(child.path)
    shutil.rmtree(tmp_path / "got")
    with pytest.raises(UserError, match="model_uri"):
        PullConfig(model_uri="tiny@champion", out="x").validate()
    bad = subprocess.run([*run, "push", "--artifact", str(tmp_path), "--name", "x"], **cwd)
    assert bad.returncode == 2 and "not a Shrinkwrap artifact" in bad.stderr
