"""`python -m export.registry push|pull|list`: artifacts in an MLflow model registry.

push: one MLflow run per artifact (its files as run artifacts, the making step's config as params,
the manifest's measured metrics as metrics, lineage as tags), then a model version registered from
`runs:/<run>/artifact` with tags (kind, content hash, Shrinkwrap version, parent name/version when
the parent is registered) and an optional alias. The same content pushed twice stays one version.
pull: a version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) downloaded and verified against
its manifest and its registered content hash before it appears at --out.
list: versions with aliases, kind, key metrics and parent.

Default registry: an embedded SQLite store under artifacts/registry/ (offline, no server);
`--tracking-uri http://host:port` or MLFLOW_TRACKING_URI for a team server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from compress.artifact import Artifact, open_artifact, verify
from core.config import field, parse_config
from core.errors import UserError, run_main

DEFAULT_DIR = Path("artifacts/registry")
EXPERIMENT = "shrinkwrap"
RUN_PATH = "artifact"  # where the files sit inside the run's artifacts
KEY_METRICS = ("perplexity", "kl", "top1_agreement", "size_mb", "decode_tok_s_b1", "ttft_ms")


class IntegrityError(UserError):
    """A downloaded file does not match the manifest or the registered content hash (exit 1)."""

    exit_code = 1


@dataclass
class PushConfig:
    artifact: str = field(None, help="artifact directory to register")
    name: str = field(None, help="registered model name")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else an "
                                     "embedded SQLite store under artifacts/registry/)")
    alias: str | None = field(None, help="alias to point at this version (e.g. champion)")
    tag: list[str] = field([], help="extra version tags as key=value")

    def validate(self) -> None:
        if not self.artifact or not self.name:
            raise UserError("artifact and name are required")
        if not re.fullmatch(r"[\w.\-]+", self.name):
            raise UserError(f"name: letters, digits, '_', '-' and '.' only, got {self.name!r}")
        if self.alias is not None and not re.fullmatch(r"[A-Za-z_][\w\-]*", self.alias):
            raise UserError(f"alias: a word such as champion, got {self.alias!r}")
        for item in self.tag:
            if "=" not in item or not item.split("=", 1)[0]:
                raise UserError(f"tag: expected key=value, got {item!r}")

    def tags(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.tag)


@dataclass
class PullConfig:
    model_uri: str = field(None, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    out: str = field(None, help="directory to create (must not exist)")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (as for push)")

    def validate(self) -> None:
        if not self.model_uri or not self.out:
            raise UserError("model_uri and out are required")
        parse_model_uri(self.model_uri)


@dataclass
class ListConfig:
    name: str | None = field(None, help="only this registered model")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (as for push)")


@dataclass
class Registered:
    name: str
    version: str
    created: bool  # False: this content was already registered


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) from models:/NAME/VERSION or models:/NAME@ALIAS."""
    match = re.fullmatch(r"models:/([\w.\-]+)(?:/(\d+)|@([A-Za-z_][\w\-]*))", uri or "")
    if not match:
        raise UserError(f"model_uri: expected models:/NAME/VERSION or models:/NAME@ALIAS, got {uri!r}")
    return match.group(1), match.group(2), match.group(3)


def default_tracking_uri(explicit: str | None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def registry_client(tracking_uri: str | None) -> Iterator[Any]:
    """An MlflowClient on the tracking URI, checked reachable first; MLflow's errors become one line."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a registry that is down fails now,
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # not after minutes of retries
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as exc:
        raise UserError("mlflow is not installed: pip install 'lm-shrinkwrap[export]'") from exc
    uri = default_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except httpx.HTTPError as exc:
            raise UserError(f"registry {uri} is not reachable ({type(exc).__name__})") from None
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"registry {uri}: {first}") from None


def _experiment_id(client: Any, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # embedded store: files beside the database
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def _versions(client: Any, name: str | None = None) -> list[Any]:
    found = client.search_model_versions(f"name='{name}'" if name else None)
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def find_by_content(client: Any, content_hash: str, name: str | None = None) -> Any | None:
    """The earliest registered version holding this content (of `name`, or of any model)."""
    for version in _versions(client, name):
        if version.tags.get("content_hash") == content_hash:
            return version
    return None


def mlflow_key(name: str) -> str:
    """MLflow param/metric names allow letters, digits, '_', '-', '.', ' ' and '/': anything else becomes '_'."""
    return re.sub(r"[^\w.\- /]", "_", name)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[mlflow_key(prefix)[:250]] = str(value)[:6000]


def run_contents(artifact: Artifact) -> tuple[dict[str, str], dict[str, float], dict[str, str]]:
    """(params, metrics, tags) a push logs: step config, numeric measured metrics, kind and lineage."""
    manifest = artifact.manifest
    params: dict[str, str] = {}
    _flatten("", manifest["step"].get("config", {}), params)
    params["step"] = manifest["step"]["name"]
    metrics = {mlflow_key(k): float(v) for k, v in manifest.get("metrics", {}).get("values", {}).items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    tags = {"kind": artifact.kind, "content_hash": artifact.content_hash, "shrinkwrap_version": _version(),
            "command": manifest["step"].get("command", "")[:5000]}
    parent = manifest.get("parent")
    if parent:
        tags["parent_content_hash"] = parent["content_hash"]
        tags["parent_kind"] = parent["kind"]
    return params, metrics, tags


def _version() -> str:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("lm-shrinkwrap")
    return "unknown"


def push(cfg: PushConfig) -> Registered:
    """Register an artifact; nothing half-registered is left behind when any step fails."""
    artifact = open_artifact(cfg.artifact)
    problems = verify(artifact)
    if problems:
        raise UserError(f"refusing to register a damaged artifact: {problems[0]}")
    uri = default_tracking_uri(cfg.tracking_uri)
    with registry_client(uri) as client:
        existing = find_by_content(client, artifact.content_hash, cfg.name)
        if existing is not None:
            if cfg.alias:
                client.set_registered_model_alias(cfg.name, cfg.alias, existing.version)
            return Registered(cfg.name, str(existing.version), created=False)
        params, metrics, tags = run_contents(artifact)
        parent_hash = tags.get("parent_content_hash")
        parent = find_by_content(client, parent_hash) if parent_hash else None
        if parent is not None:
            tags["parent_model"], tags["parent_version"] = parent.name, str(parent.version)
        run_id, version = None, None
        try:
            run = client.create_run(_experiment_id(client, uri), run_name=f"{cfg.name}-{artifact.kind}",
                                    tags={f"shrinkwrap.{k}": v for k, v in tags.items()})
            run_id = run.info.run_id
            _log(client, run_id, params, metrics)
            client.log_artifacts(run_id, str(artifact.path), RUN_PATH)
            client.set_terminated(run_id)
            with contextlib.suppress(Exception):  # exists already: fine (checked by create_model_version)
                client.create_registered_model(cfg.name)
            version = client.create_model_version(cfg.name, f"runs:/{run_id}/{RUN_PATH}", run_id=run_id,
                                                  tags={**tags, **cfg.tags()}).version
            if cfg.alias:
                client.set_registered_model_alias(cfg.name, cfg.alias, version)
        except BaseException:
            with contextlib.suppress(Exception):
                if version is not None:
                    client.delete_model_version(cfg.name, version)
                if run_id is not None:
                    client.delete_run(run_id)
            raise
        return Registered(cfg.name, str(version), created=True)


def _log(client: Any, run_id: str, params: dict[str, str], metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


def pull(cfg: PullConfig) -> Artifact:
    """Download a registered version into --out, verified: on any mismatch nothing is left at --out."""
    out = Path(cfg.out)
    if out.exists():
        raise UserError(f"out: {out} already exists")
    name, number, alias = parse_model_uri(cfg.model_uri)
    with registry_client(cfg.tracking_uri) as client:
        version = (client.get_model_version_by_alias(name, alias) if alias else
                   client.get_model_version(name, number))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.pull-"))
        try:
            client.download_artifacts(version.run_id, RUN_PATH, str(tmp))
            artifact = open_artifact(tmp / RUN_PATH)
            problems = verify(artifact)
            if problems:
                raise IntegrityError(problems[0].replace(str(tmp / RUN_PATH), cfg.model_uri))
            if artifact.content_hash != version.tags.get("content_hash"):
                raise IntegrityError(f"{cfg.model_uri}: the manifest's content hash {artifact.content_hash[:16]}… "
                                     f"is not the registered {version.tags.get('content_hash', '?')[:16]}…")
            (tmp / RUN_PATH).chmod(0o755)
            os.rename(tmp / RUN_PATH, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_artifact(out)


def list_versions(cfg: ListConfig) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, kind, key metrics, parent."""
    rows = []
    with registry_client(cfg.tracking_uri) as client:
        aliases: dict[tuple[str, str], list[str]] = {}
        for model in client.search_registered_models():
            for alias, number in (model.aliases or {}).items():
                aliases.setdefault((model.name, str(number)), []).append(alias)
        for v in _versions(client, cfg.name):
            run_metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
            parent = (f"{v.tags['parent_model']}/{v.tags['parent_version']}" if "parent_model" in v.tags else
                      (v.tags.get("parent_content_hash", "")[:12] or "–"))
            rows.append({"name": v.name, "version": str(v.version),
                         "aliases": sorted(aliases.get((v.name, str(v.version)), [])),
                         "kind": v.tags.get("kind", "?"), "content_hash": v.tags.get("content_hash", ""),
                         "parent": parent, "metrics": {k: run_metrics[k] for k in KEY_METRICS if k in run_metrics}})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no registered versions"
    lines = ["| model | version | aliases | kind | ppl | KL | top-1 | MB | decode b1 tok/s | parent | content |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]

        def g(key: str, fmt: str, m: dict = m) -> str:
            return format(m[key], fmt) if key in m else "–"
        lines.append(f"| {r['name']} | {r['version']} | {', '.join(r['aliases']) or '–'} | {r['kind']} | "
                     f"{g('perplexity', '.2f')} | {g('kl', '.4f')} | {g('top1_agreement', '.3f')} | "
                     f"{g('size_mb', '.0f')} | {g('decode_tok_s_b1', '.1f')} | {r['parent']} | {r['content_hash'][:12]} |")
    return "\n".join(lines)


COMMANDS = {"push": PushConfig, "pull": PullConfig, "list": ListConfig}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\nusage: python -m export.registry {push,pull,list} [--help]",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    cfg = parse_config(COMMANDS[command], rest, f"python -m export.registry {command}",
                       (__doc__.splitlines()[0]))
    if command == "push":
        done = push(cfg)
        uri = default_tracking_uri(cfg.tracking_uri)
        if done.created:
            print(f"registered {cfg.artifact} as {done.name} version {done.version} in {uri}"
                  + (f" (alias {cfg.alias})" if cfg.alias else ""))
        else:
            print(f"already registered: {cfg.artifact} has the content of {done.name} version {done.version} "
                  f"in {uri}; no new version")
    elif command == "pull":
        artifact = pull(cfg)
        print(f"pulled {cfg.model_uri} to {artifact.path} ({len(artifact.manifest['files'])} files verified, "
              f"content {artifact.content_hash[:16]}…)")
    else:
        print(format_rows(list_versions(cfg)))


if __name__ == "__main__":
    run_main(main)
