"""`python -m export.bundle --artifact A --out hand-off.tar.gz`: what a deployment team takes away.

One tar.gz holding one folder: `artifact/` (the files, manifest and model card), `lineage/` (the
manifests of every parent found), `eval/` (the latest evaluation report for it, when there is one),
`DEPLOY.md` (exact commands for our runtime and the external engines that read this format, the
expected accuracy and speed, the hardware they were measured on) and `SHA256SUMS` (`sha256sum -c
SHA256SUMS` inside the folder checks every byte). Written atomically; a damaged artifact, an existing
--out or anything that is not an artifact stops before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compress.artifact import Artifact, config_hash, lineage, open_artifact, verify
from core.config import field, parse_config
from core.errors import UserError, run_main

PROMPT = "What is the capital of France?"


@dataclass
class BundleConfig:
    artifact: str = field(None, help="artifact directory to hand off")
    out: str = field(None, help="the .tar.gz to write (must not exist)")
    report: str | None = field(None, help="evaluation folder (report.json/.md, pareto.png); default: the one "
                               "recorded in the artifact's manifest by compress.evaluate, if it still exists")
    overwrite: bool = field(False, help="replace an existing --out")

    def validate(self) -> None:
        if not self.artifact or not self.out:
            raise UserError("artifact and out are required")
        if not self.out.endswith((".tar.gz", ".tgz")):
            raise UserError(f"out: a .tar.gz path, got {self.out!r}")


def _metric_lines(artifact: Artifact) -> list[str]:
    metrics = artifact.metrics
    values = metrics.get("values", {})
    if not values:
        return ["No measurements recorded (run `python -m compress.evaluate` on it first)."]
    names = {"perplexity": "held-out perplexity", "reference_perplexity": "reference perplexity (same tokens)",
             "kl": "KL(reference ‖ this) per token", "top1_agreement": "top-1 agreement with the reference",
             "size_mb": "size on disk (MB)", "parameters": "parameters", "prefill_tok_s": "prefill tokens/s",
             "decode_tok_s_b1": "decode tokens/s, batch 1", "decode_tok_s_b8": "decode tokens/s, batch 8",
             "ttft_ms": "time to first token (ms)", "peak_rss_mb": "peak RSS (MB)", "backend": "backend measured"}
    lines = ["| metric | value |", "|---|---|"]
    for key, label in names.items():
        if values.get(key) is not None:
            value = values[key]
            lines.append(f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |")
    machine = metrics.get("machine", {})
    protocol = metrics.get("protocol", {})
    lines += ["", f"Measured by `{metrics.get('command', '?')}` at {metrics.get('time', '?')} on "
              f"{machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores"
              + (f", GPU {machine['gpu']}" if machine.get("gpu") else "") + f", {machine.get('platform', '?')}).",
              f"Accuracy protocol: {protocol.get('windows', '?')} held-out windows x {protocol.get('seq_len', '?')} "
              f"tokens ({protocol.get('tokens_scored', '?')} scored). Speed on a shared or loaded machine varies: "
              "re-measure on yours."]
    return lines


def deploy_markdown(artifact: Artifact) -> str:
    """DEPLOY.md for this artifact's kind. The runtime commands are executed by tests; the external
    engines' commands are stated with their known limits and are not run here (no GPU, no vLLM)."""
    m = artifact.manifest
    config = _hf_config(artifact)
    quant = config.get("quantization_config")
    kind = artifact.kind
    lines = [f"# Deploying {m.get('name', artifact.path.name)}", "",
             f"A Shrinkwrap **{kind}** artifact (content hash `{artifact.content_hash}`), made by "
             f"`{m['step'].get('command', m['step']['name'])}`.", "",
             "## Check it", "", "```bash", "sha256sum -c SHA256SUMS", "```", "",
             "## Run it with Shrinkwrap's runtime (tested)", "",
             "Commands from this folder; the runtime needs no training stack:", "", "```bash",
             "pip install 'lm-shrinkwrap[runtime]'",
             f"python -m runtime.generate --artifact artifact --chat --prompt '{PROMPT}' --max-tokens 24",
             "python -m runtime.serve --artifact artifact --port 8000 --model-name model",
             "```", "",
             "The server speaks the OpenAI API (`/v1/completions`, `/v1/chat/completions`, streaming, logprobs); "
             "`python -m runtime.bench --url http://127.0.0.1:8000 --artifact artifact` load-tests it.", ""]
    lines += ["## Other engines that read this format (not executed by Shrinkwrap's tests)", ""]
    if kind == "onnx":
        lines += ["onnxruntime-genai reads the folder as it is (`genai_config.json`):", "", "```python",
                  "import onnxruntime_genai as og  # pip install onnxruntime-genai",
                  "model = og.Model('artifact')", "```", ""]
        if m.get("onnx", {}).get("kv_cache") == "concat":
            lines += ["This export comes from the torch.onnx fallback (`kv_cache: concat`): onnxruntime-genai "
                      "does not run it; Shrinkwrap's runtime does.", ""]
    elif kind == "tensorrt-llm":
        lines += ["Build the engine on the target GPU with TensorRT-LLM: see `artifact/build.sh`.", ""]
    elif quant and quant.get("quant_method") == "shrinkwrap-int8-dynamic":
        lines += ["`shrinkwrap-int8-dynamic` is Shrinkwrap's own format: only Shrinkwrap's runtime loads it. "
                  "Export it to ONNX (`python -m export.onnx`) for another engine.", ""]
    else:
        gptq = quant is not None and quant.get("quant_method") == "gptq"
        lines += ["vLLM and Text Generation Inference read this Hugging Face folder:", "", "```bash",
                  "vllm serve ./artifact" + (" --quantization gptq" if gptq else " --dtype auto"),
                  "docker run --gpus all -p 8080:80 -v $PWD/artifact:/data/model "
                  "ghcr.io/huggingface/text-generation-inference --model-id /data/model"
                  + (" --quantize gptq" if gptq else ""), "```", ""]
        if gptq:
            sizes = sorted({config.get("hidden_size"), config.get("intermediate_size")} - {None})
            odd = [k for k in sizes if k % 128]
            lines += [f"GPTQ {quant.get('bits')}-bit, group {quant.get('group_size')}, act-order "
                      f"{quant.get('desc_act')}, {'symmetric' if quant.get('sym') else 'asymmetric'}."]
            if odd:
                lines += [f"Known limit: vLLM's Marlin GPTQ kernel needs input sizes divisible by 128; this model "
                          f"has {', '.join(map(str, odd))}, so vLLM falls back to its slower GPTQ kernel."]
            lines += [""]
    lines += ["## Expected accuracy and speed (from the manifest)", "", *_metric_lines(artifact), ""]
    return "\n".join(lines) + "\n"


def _hf_config(artifact: Artifact) -> dict[str, Any]:
    """The artifact's config.json ({} when it has none or it is unreadable)."""
    config = artifact.path / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def find_report(artifact: Artifact, explicit: str | None) -> Path | None:
    """The evaluation folder: --report, else the newest recorded one that still has report.json."""
    if explicit:
        folder = Path(explicit)
        if not (folder / "report.json").is_file():
            raise UserError(f"report: {folder} has no report.json")
        return folder
    for entry in [artifact.metrics, *reversed(artifact.manifest.get("metrics_history") or [])]:
        folder = entry.get("report") if entry else None
        if folder and (Path(folder) / "report.json").is_file():
            return Path(folder)
    return None


def bundle(cfg: BundleConfig) -> Path:
    artifact = open_artifact(cfg.artifact)
    problems = verify(artifact)
    if problems:
        raise UserError(f"refusing to bundle a damaged artifact: {problems[0]}")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"out: {out} already exists (pass --overwrite to replace it)")
    report = find_report(artifact, cfg.report)
    root = out.name.removesuffix(".tar.gz").removesuffix(".tgz")
    members: dict[str, bytes | Path] = {}
    for file in sorted(artifact.path.rglob("*")):
        if file.is_file():
            members[f"artifact/{file.relative_to(artifact.path).as_posix()}"] = file
    for depth, (parent, link) in enumerate(lineage(artifact), start=1):
        manifest = parent.manifest if parent is not None else {"missing": True, "link": link}
        name = f"lineage/{depth:02d}-{link['kind']}-{link['content_hash'][:12]}.json"
        members[name] = (json.dumps(manifest, indent=2) + "\n").encode()
    if report is not None:
        for name in ("report.json", "report.md", "pareto.png"):
            if (report / name).is_file():
                members[f"eval/{name}"] = report / name
    members["DEPLOY.md"] = deploy_markdown(artifact).encode()
    members["BUNDLE.json"] = (json.dumps({"artifact": artifact.path.name, "content_hash": artifact.content_hash,
                                          "config_hash": config_hash(asdict(cfg)),
                                          "report": str(report) if report else None}, indent=2) + "\n").encode()
    sums = []
    for name, data in members.items():
        digest = hashlib.sha256(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()
        sums.append(f"{digest}  {name}")
    members["SHA256SUMS"] = ("\n".join(sums) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:  # weights barely compress: be quick
            for name, data in members.items():
                if isinstance(data, Path):
                    tar.add(data, arcname=f"{root}/{name}", recursive=False)
                else:
                    info = tarfile.TarInfo(f"{root}/{name}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(BundleConfig, argv, "python -m export.bundle", __doc__.splitlines()[0])
    out = bundle(cfg)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): unpack with `tar xzf {out.name}`, then "
          "`sha256sum -c SHA256SUMS` and DEPLOY.md inside")


if __name__ == "__main__":
    run_main(main)
