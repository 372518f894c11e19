"""`python -m compress.pipeline --config configs/pipeline/NAME.yaml`: a recipe of steps, run in order.

A recipe is a list of steps, each one command's plain function with that command's keys
(reference, distill, prune, quantize, export.onnx, evaluate, bundle, registry). A step's `artifact`
(the teacher, for distill) defaults to the previous step's output; bare names resolve under the
recipe's `out_dir`. A rerun skips every step whose output is intact and was made with the same
config (the config hash in its manifest, report or bundle), so a crashed or killed pipeline resumes
where it stopped; a step whose config changed is redone.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.artifact import config_hash, open_artifact, verify
from core.config import build_config, field, parse_config
from core.errors import UserError, run_main

PATH_KEYS = ("artifact", "teacher", "reference", "out", "report")


@dataclass
class PipelineConfig:
    steps: list[dict] = field([], help="the recipe: a list of {step: NAME, ...that command's keys}")
    out_dir: str = field("artifacts/pipeline", help="where bare names in the steps resolve")

    def validate(self) -> None:
        if not self.steps:
            raise UserError("steps: the recipe has no steps")
        for i, step in enumerate(self.steps):
            if not isinstance(step, dict) or step.get("step") not in STEPS:
                raise UserError(f"steps[{i}]: 'step' must be one of {', '.join(STEPS)}, got "
                                f"{step.get('step') if isinstance(step, dict) else step!r}")


@dataclass
class RegistryStep:
    """Push several artifacts: `names[i]` for `artifacts[i]`, all in one registry."""

    artifacts: list[str] = field([], help="artifacts to push")
    names: list[str] = field([], help="registered model name for each artifact")
    tracking_uri: str | None = field(None, help="MLflow tracking URI (default: the embedded SQLite store)")
    alias: str | None = field(None, help="alias for each pushed version")

    def validate(self) -> None:
        if not self.artifacts or len(self.names) != len(self.artifacts):
            raise UserError("registry: give one name per artifact (names: [...], artifacts: [...])")


def run_registry(cfg: RegistryStep) -> list[str]:
    from export.registry import PushConfig, default_tracking_uri, push

    lines = []
    for path, name in zip(cfg.artifacts, cfg.names, strict=True):
        done = push(PushConfig(artifact=path, name=name, tracking_uri=cfg.tracking_uri, alias=cfg.alias))
        lines.append(f"{name} version {done.version}" + ("" if done.created else " (already registered)"))
    print(f"registry {default_tracking_uri(cfg.tracking_uri)}: " + "; ".join(lines), flush=True)
    return lines


def _registry_uri(cfg: RegistryStep) -> str:
    from export.registry import default_tracking_uri

    return default_tracking_uri(cfg.tracking_uri)


def _fingerprint(config: dict[str, Any]) -> str:
    return config_hash(json.loads(json.dumps(config, default=str)))


def artifact_done(cfg: Any) -> bool:
    out = Path(cfg.out)
    if not out.exists():
        return False
    try:
        artifact = open_artifact(out)
    except UserError:
        return False
    stored = artifact.manifest.get("step", {}).get("config")
    if stored is None or _fingerprint(stored) != _fingerprint(dataclasses.asdict(cfg)) or verify(artifact):
        return False
    source = getattr(cfg, "artifact", None) or getattr(cfg, "teacher", None)  # the step's input, if any
    parent = artifact.manifest.get("parent")
    if source is None or parent is None:
        return True
    try:  # made from the input as it is now, not from an input that was redone since
        return open_artifact(source).content_hash == parent["content_hash"]
    except UserError:
        return False


def report_done(cfg: Any) -> bool:
    report = Path(cfg.out) / "report.json"
    if not report.is_file():
        return False
    data = json.loads(report.read_text())
    if _fingerprint(data.get("config", {})) != _fingerprint(dataclasses.asdict(cfg)):
        return False
    try:  # the same artifacts, unchanged since they were measured
        current = {str(Path(p)): open_artifact(p).content_hash for p in cfg.artifacts}
    except UserError:
        return False
    return {str(Path(r["path"])): r.get("content_hash") for r in data.get("results", [])} == current


def bundle_done(cfg: Any) -> bool:
    out = Path(cfg.out)
    if not out.is_file():
        return False
    try:
        with tarfile.open(out) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/BUNDLE.json"))
            info = json.loads(tar.extractfile(member).read())
        artifact = open_artifact(cfg.artifact)
    except (tarfile.TarError, StopIteration, UserError, json.JSONDecodeError, OSError):
        return False
    return info.get("config_hash") == config_hash(dataclasses.asdict(cfg)) \
        and info.get("content_hash") == artifact.content_hash


def _lazy(module: str, name: str) -> Callable[[], Any]:
    """Import on use: a recipe pays only for the steps it has (and `export` stays out of `compress`'s imports)."""
    def get() -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)
    return get


def _on_artifact(module: str, name: str) -> Callable[[Any], Any]:
    return lambda cfg: _lazy(module, name)()(open_artifact(cfg.artifact), cfg)


def _run_evaluate(cfg: Any) -> Any:
    from compress.evaluate import evaluate, markdown_table

    report = evaluate(cfg)
    print(markdown_table(report), flush=True)
    return report


# name -> (config class, run, is-done)
STEPS: dict[str, tuple[Callable[[], type], Callable[[Any], Any], Callable[[Any], bool]]] = {
    "reference": (_lazy("compress.reference", "ReferenceConfig"),
                  lambda cfg: _lazy("compress.reference", "make_reference")()(cfg), artifact_done),
    "distill": (_lazy("compress.distill", "DistillConfig"),
                lambda cfg: _lazy("compress.distill", "distill")()(cfg), artifact_done),
    "prune": (_lazy("compress.prune", "PruneConfig"), _on_artifact("compress.prune", "prune"), artifact_done),
    "quantize": (_lazy("compress.quantize", "QuantizeConfig"), _on_artifact("compress.quantize", "quantize"),
                 artifact_done),
    "export.onnx": (_lazy("export.onnx", "OnnxExportConfig"), _on_artifact("export.onnx", "export_onnx"),
                    artifact_done),
    "evaluate": (_lazy("compress.evaluate", "EvaluateConfig"), _run_evaluate, report_done),
    "bundle": (_lazy("export.bundle", "BundleConfig"), lambda cfg: _lazy("export.bundle", "bundle")()(cfg),
               bundle_done),
    "registry": (lambda: RegistryStep, run_registry, lambda cfg: False),  # push itself is idempotent
}
PRODUCES_ARTIFACT = ("reference", "distill", "prune", "quantize", "export.onnx")


def _resolve(value: Any, out_dir: Path) -> Any:
    if isinstance(value, list):
        return [_resolve(v, out_dir) for v in value]
    if isinstance(value, str) and "/" not in value and value not in ("", "."):
        return str(out_dir / value)
    return value


def resolve_steps(cfg: PipelineConfig, source: str) -> list[tuple[str, Any]]:
    """Each step's config object, with defaults chained and names resolved; all checked before any work."""
    out_dir = Path(cfg.out_dir)
    resolved, previous, first_reference = [], None, None
    for i, raw in enumerate(cfg.steps):
        name = raw["step"]
        values = {k: v for k, v in raw.items() if k != "step"}
        for key in (*PATH_KEYS, "artifacts"):
            if key in values:
                values[key] = _resolve(values[key], out_dir)
        config_cls = STEPS[name][0]()
        keys = {f.name for f in dataclasses.fields(config_cls)}
        if previous is not None:
            input_key = "teacher" if name == "distill" else "artifact"
            if input_key in keys and input_key not in values:
                values[input_key] = previous
            if name in ("evaluate", "registry") and "artifacts" not in values:
                values["artifacts"] = [previous]
        if name == "evaluate" and "reference" not in values and first_reference is not None:
            values["reference"] = first_reference
        if name == "registry" and "names" not in values and "artifacts" in values:
            values["names"] = [Path(a).name for a in values["artifacts"]]
        config = build_config(config_cls, values, f"{source}: steps[{i}] ({name})")
        resolved.append((name, config))
        if name in PRODUCES_ARTIFACT:
            previous = config.out
            if name == "reference" and first_reference is None:
                first_reference = config.out
    return resolved


def run_pipeline(cfg: PipelineConfig, source: str = "pipeline") -> list[dict[str, Any]]:
    """Run (or skip) every step in order; returns what each step did."""
    steps = resolve_steps(cfg, source)
    done = []
    for i, (name, step_cfg) in enumerate(steps, start=1):
        label = f"[{i}/{len(steps)}] {name}" + (f" -> {step_cfg.out}" if hasattr(step_cfg, "out") else "")
        run, is_done = STEPS[name][1], STEPS[name][2]
        where = getattr(step_cfg, "out", None) or (_registry_uri(step_cfg) if name == "registry" else None)
        if is_done(step_cfg):
            print(f"{label}: skipped (output intact, same config)", flush=True)
            done.append({"step": name, "skipped": True, "output": where})
            continue
        if hasattr(step_cfg, "overwrite") and Path(getattr(step_cfg, "out", "") or "").exists():
            print(f"{label}: output exists with another config or damaged: redoing it", flush=True)
            step_cfg.overwrite = True
        print(f"{label} ...", flush=True)
        started = time.perf_counter()
        run(step_cfg)
        seconds = time.perf_counter() - started
        print(f"{label}: done in {seconds:.0f} s", flush=True)
        done.append({"step": name, "skipped": False, "seconds": seconds, "output": where})
    return done


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(PipelineConfig, argv, "python -m compress.pipeline", __doc__.splitlines()[0])
    started = time.perf_counter()
    done = run_pipeline(cfg, "pipeline config")
    ran = sum(not d["skipped"] for d in done)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s: {ran} step(s) run, "
          f"{len(done) - ran} skipped. Where everything is:")
    for d in done:
        print(f"  {d['step']:<12} {d['output']}")


if __name__ == "__main__":
    run_main(main)
