"""`python -m compress.evaluate`: accuracy against speed for artifacts, beside the reference.

Accuracy runs on the held-out protocol (articles 200-299 joined by blank lines, 512-token windows)
and on the same tokens for every artifact: perplexity, mean KL(reference || artifact) per token,
top-1 agreement. Speed runs each artifact in a fresh process (`compress.speed`) so peak RSS is its
own. Writes report.json, report.md and pareto.png, and records the metrics in each manifest.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from compress.artifact import command_line, machine_description, open_artifact, record_metrics, verify
from compress.models import count_parameters, load_artifact_model, load_tokenizer
from core.config import field, parse_config
from core.data import heldout_windows
from core.errors import UserError, run_main


@dataclass
class EvaluateConfig:
    reference: str = field("artifacts/reference", help="the uncompressed reference artifact")
    artifacts: list[str] = field([], help="artifacts to evaluate (the reference may be listed too)")
    out: str = field("artifacts/eval", help="directory for report.json, report.md, pareto.png")
    max_eval_tokens: int | None = field(None, help="evaluate only the first N held-out tokens (whole windows)")
    seq_len: int = field(512, help="window length of the held-out protocol")
    speed: bool = field(True, help="measure speed (each artifact in its own process)")
    new_tokens: int = field(128, help="greedy tokens per decode measurement")
    threads: int | None = field(None, help="torch threads for the speed runs")
    device: str = field("cpu", help="device for accuracy and speed runs (cpu or cuda)")
    record: bool = field(True, help="write the measured metrics into each artifact's manifest")
    early_exit: str | None = field(None, help="an exit-head, early-exit or layers draft made for --reference: adds lossy "
                                   "early exit's accuracy-vs-speed curve (runtime.generate --early-exit-threshold)")
    exit_thresholds: list[float] = field([0.5, 0.7, 0.8, 0.9, 0.95], help="early exit: the thresholds of the curve")
    exit_prompts: int = field(4, help="early exit: held-out chat prompts for its speed")

    def validate(self) -> None:
        if not self.artifacts:
            raise UserError("artifacts: name at least one artifact")
        if self.early_exit is not None and (not self.exit_thresholds or self.exit_prompts < 1
                                            or any(not 0 < t <= 1 for t in self.exit_thresholds)):
            raise UserError("exit_thresholds: probabilities in (0, 1]; exit_prompts: at least 1")
        if self.max_eval_tokens is not None and self.max_eval_tokens < self.seq_len:
            raise UserError(f"max_eval_tokens: must be at least seq_len ({self.seq_len})")


@torch.inference_mode()
def accuracy_metrics(reference: torch.nn.Module, models: dict[str, torch.nn.Module],
                     windows: torch.Tensor) -> dict[str, dict[str, float]]:
    """Perplexity, KL(ref || model) and top-1 agreement on the same next-token positions."""
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in models}
    ref_nll = 0.0
    count = 0
    for window in tqdm(windows, desc="accuracy (windows)", unit="win"):
        ids = window[None]
        targets = ids[0, 1:]
        ref_logp = torch.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)
        ref_nll += -ref_logp.gather(1, targets[:, None]).sum().item()
        ref_top1 = ref_logp.argmax(-1)
        ref_p = ref_logp.exp()
        count += targets.numel()
        for name, model in models.items():
            logp = ref_logp if model is reference else torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            sums[name]["nll"] += -logp.gather(1, targets[:, None]).sum().item()
            sums[name]["kl"] += (ref_p * (ref_logp - logp)).sum().item()
            sums[name]["agree"] += (logp.argmax(-1) == ref_top1).sum().item()
    results = {"__reference__": {"perplexity": math.exp(ref_nll / count), "tokens": count}}
    for name, s in sums.items():
        results[name] = {"perplexity": math.exp(s["nll"] / count), "kl": max(s["kl"], 0.0) / count,
                         "top1_agreement": s["agree"] / count, "tokens": count}
    return results


def run_speed(path: str, cfg: EvaluateConfig) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "compress.speed", "--artifact", path, "--device", cfg.device,
           "--new-tokens", str(cfg.new_tokens)]
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its progress lines show on stderr
    if proc.returncode != 0:
        raise UserError(f"speed measurement failed for {path} (exit {proc.returncode}; its messages are above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])["speed"]


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Measure every artifact; write report.json / report.md / pareto.png under cfg.out."""
    ref_artifact = open_artifact(cfg.reference)
    artifacts = {p: open_artifact(p) for p in cfg.artifacts}
    for artifact in [ref_artifact, *artifacts.values()]:
        problems = verify(artifact)
        if problems:
            raise UserError(f"refusing to evaluate a damaged artifact: {problems[0]}")
    tokenizer = load_tokenizer(ref_artifact.path)
    windows = heldout_windows(tokenizer, cfg.seq_len, cfg.max_eval_tokens)
    reference = load_artifact_model(ref_artifact.path, device=cfg.device)
    acc: dict[str, dict[str, float]] = {}
    parameters: dict[str, int] = {}
    for p in artifacts:  # one model beside the reference at a time (the reference runs again per model)
        model = reference if Path(p).resolve() == ref_artifact.path.resolve() else load_artifact_model(
            p, device=cfg.device)
        acc.update(accuracy_metrics(reference, {p: model}, windows.to(cfg.device)))
        parameters[p] = count_parameters(model)
        del model

    rows = []
    command = command_line("compress.evaluate")
    protocol = {"split": "heldout articles 200-299", "seq_len": cfg.seq_len, "windows": int(windows.shape[0]),
                "tokens_scored": acc["__reference__"]["tokens"], "corpus_sha256": heldout_corpus_hash(),
                "full": cfg.max_eval_tokens is None, "reference_content_hash": ref_artifact.content_hash}
    for i, (path, artifact) in enumerate(artifacts.items()):
        if cfg.speed:
            print(f"speed {i + 1}/{len(artifacts)}: {artifact.path.name} (a fresh process; about 1-3 min on 2 CPU "
                  "cores) ...", file=sys.stderr, flush=True)
        row = {"name": artifact.path.name, "path": str(artifact.path), "kind": artifact.kind,
               "content_hash": artifact.content_hash,
               "parameters": parameters[path],
               "size_mb": artifact.model_size_bytes() / 1e6,
               "backend": "onnxruntime-cpu" if artifact.kind == "onnx" else f"pytorch-{cfg.device}", **acc[path]}
        if cfg.speed:
            row.update(run_speed(path, cfg))
        rows.append(row)
        if cfg.record:
            values = {k: v for k, v in row.items() if k not in ("name", "path", "kind", "content_hash")}
            values["reference_perplexity"] = acc["__reference__"]["perplexity"]
            if not record_metrics(artifact, values, command, protocol, str(Path(cfg.out).resolve())):
                print(f"{artifact.path.name}: a subset run ({protocol['tokens_scored']} tokens) is kept in the history; "
                      "the manifest's metrics stay the full-protocol ones", file=sys.stderr)
    rows.sort(key=lambda r: (r["path"] != str(ref_artifact.path), r["name"]))
    report = {"reference": str(ref_artifact.path), "reference_perplexity": acc["__reference__"]["perplexity"],
              "protocol": protocol,
              "command": command, "config": asdict(cfg), "machine": machine_description(), "results": rows}
    if cfg.early_exit is not None:
        report["early_exit"] = early_exit_curve(cfg, ref_artifact, reference, tokenizer, windows)
    write_report(report, Path(cfg.out))
    return report


def early_exit_curve(cfg: EvaluateConfig, ref_artifact: Any, reference: torch.nn.Module, tokenizer: Any,
                     windows: torch.Tensor) -> dict[str, Any]:
    from compress.early_exit import exit_accuracy, exit_speed
    from runtime.eagle import is_eagle_draft
    from runtime.exit_head import exit_logits, is_exit_head, load_exit_head
    from runtime.loading import check_draft_target

    if is_eagle_draft(cfg.early_exit):
        raise UserError(f"early_exit: {cfg.early_exit} is an EAGLE head; early exit needs an exit-head, "
                        "early-exit or layers draft")
    check_draft_target(cfg.early_exit, str(ref_artifact.path), force=False)
    if is_exit_head(cfg.early_exit):  # the reference's own first L layers, then the exit
        head = load_exit_head(cfg.early_exit, reference)

        def exit_fn(ids: torch.Tensor) -> torch.Tensor:
            hidden = reference.model(ids, output_hidden_states=True).hidden_states[head.exit_layer]
            return exit_logits(head, reference, hidden)
    else:
        exit_model = load_artifact_model(cfg.early_exit, device=cfg.device)

        def exit_fn(ids: torch.Tensor) -> torch.Tensor:
            return exit_model(ids).logits
    curve = {"draft": cfg.early_exit,
             "accuracy": exit_accuracy(reference, exit_fn, windows.to(cfg.device), cfg.exit_thresholds)}
    if cfg.speed:
        curve["speed"] = exit_speed(str(ref_artifact.path), cfg.early_exit, tokenizer, cfg.exit_thresholds,
                                    cfg.exit_prompts, cfg.new_tokens, cfg.device)
    return curve


def heldout_corpus_hash() -> str:
    import hashlib

    from core.data import load_corpus

    return hashlib.sha256("\n\n".join(load_corpus("heldout")).encode()).hexdigest()


def markdown_table(report: dict[str, Any]) -> str:
    p = report["protocol"]
    lines = [f"Held-out: {p['windows']} windows x {p['seq_len']} tokens ({p['tokens_scored']} scored tokens); "
             f"reference perplexity {report['reference_perplexity']:.2f}.", "",
             "| artifact | kind | params | size MB | ppl | Δppl | KL | top-1 | prefill tok/s | decode b1 | "
             "decode b8 | TTFT ms | peak RSS MB |", "|---" * 13 + "|"]
    ref_ppl = report["reference_perplexity"]
    for r in report["results"]:
        def g(key: str, fmt: str, r: dict = r) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "–"
        delta = f"{100 * (r['perplexity'] / ref_ppl - 1):+.1f}%"
        lines.append(f"| {r['name']} | {r['kind']} | {r['parameters'] / 1e6:.1f}M | {r['size_mb']:.0f} | "
                     f"{r['perplexity']:.2f} | {delta} | {r['kl']:.4f} | {r['top1_agreement']:.3f} | "
                     f"{g('prefill_tok_s', '.0f')} | {g('decode_tok_s_b1', '.1f')} | {g('decode_tok_s_b8', '.1f')} | "
                     f"{g('ttft_ms', '.0f')} | {g('peak_rss_mb', '.0f')} |")
    if "early_exit" in report:
        from compress.early_exit import markdown

        lines += ["", markdown(report["early_exit"]).rstrip()]
    lines += ["", f"Command: `{report['command']}`", f"Machine: {report['machine'].get('cpu', '?')}, "
              f"{report['machine'].get('cpu_count')} cores, torch threads {report['machine'].get('torch_threads')}"]
    return "\n".join(lines) + "\n"


def pareto_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in report["results"]:
        x = r.get("decode_tok_s_b1")
        if x is None:
            continue
        ax.scatter(x, r["perplexity"], s=40)
        ax.annotate(r["name"], (x, r["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=8,
                    annotation_clip=False)
    ax.margins(x=0.3, y=0.15)  # room for the labels of the outermost points
    ax.axhline(report["reference_perplexity"], color="grey", linestyle=":", linewidth=1, label="reference ppl")
    ax.set_xlabel("decode tokens/s (batch 1)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Accuracy against speed")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.2)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "report.json")
    (out / ".report.md.tmp").write_text(markdown_table(report), encoding="utf-8")
    (out / ".report.md.tmp").replace(out / "report.md")
    pareto_plot(report, out / ".pareto.tmp.png")
    (out / ".pareto.tmp.png").replace(out / "pareto.png")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(EvaluateConfig, argv, "python -m compress.evaluate", __doc__.splitlines()[0])
    report = evaluate(cfg)
    print(markdown_table(report))
    print(f"wrote {cfg.out}/report.json, report.md, pareto.png")


if __name__ == "__main__":
    run_main(main)
