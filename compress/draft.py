"""`python -m compress.draft`: a speculative-decoding draft made for one target, from the target's own answers.

Methods:
- `early-exit`: the target's first L layers with its final norm and LM head (LayerSkip's draft), then
  trained to match the target's final distribution (forward KL) on the target's chat answers;
- `layers`: L layers spread evenly over the target (today's layer-drop student), for comparison.

Both are distilled with our Lightning trainer (`compress.distill`: gradient checkpointing, resume,
`--max-minutes`, `--devices`) on chat prompts from the train split followed by the target's greedy
answers (`compress.draft_data`, cached by the target's content hash). The result is a `draft`
artifact whose parent is the target (by content hash: `runtime.generate --draft` and `runtime.serve
--draft` refuse it for another target unless `--force`) and whose manifest holds the acceptance
measured on held-out chat prompts (greedy, `k` tokens per proposal, the paged engine).
Not built yet (issue 19): EAGLE heads, an early-exit draft that shares the target's KV cache, tree
drafting and the lossy `--early-exit-threshold`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import Artifact, open_artifact, record_metrics, verify
from compress.distill import DistillConfig, distill
from core.config import field, parse_config
from core.errors import UserError, run_main

METHODS = ("early-exit", "layers")


@dataclass
class DraftConfig:
    target: str = field("artifacts/reference", help="the artifact the draft proposes tokens for")
    method: str = field("early-exit", help="early-exit: the target's first L layers; layers: L layers spread "
                        "evenly", choices=METHODS)
    out: str = field("artifacts/draft", help="output draft artifact")
    layers: int = field(4, help="L: decoder layers the draft keeps")
    prompts: int = field(512, help="train-split chat prompts the target answers (the training text)")
    answer_tokens: int = field(96, help="tokens of each target answer")
    eval_prompts: int = field(16, help="held-out chat prompts the acceptance is measured on")
    k: int = field(4, help="draft tokens per proposal when measuring acceptance")
    seq_len: int = field(256, help="tokens per training block")
    batch_size: int = field(8, help="blocks per micro-batch (per device)")
    max_steps: int = field(600, help="optimizer steps")
    max_minutes: float | None = field(None, help="stop training after this many minutes")
    lr: float = field(5e-4, help="peak learning rate")
    gradient_checkpointing: bool = field(True, help="recompute activations in backward")
    accelerator: str = field("auto", help="Lightning accelerator (auto, cpu, gpu)")
    devices: int = field(1, help="devices for the Lightning Trainer")
    resume: bool = field(False, help="continue from the last checkpoint in <out>.work")
    overwrite: bool = field(False, help="replace an existing artifact at --out")
    seed: int = field(0, help="random seed")

    def validate(self) -> None:
        for name in ("layers", "prompts", "answer_tokens", "eval_prompts", "k", "seq_len", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive")

    @property
    def work_path(self) -> Path:
        return Path(str(self.out) + ".work")


def draft_layers(method: str, target_layers: int, keep: int) -> list[int]:
    """The target's layer indices the draft starts from."""
    if keep >= target_layers:
        raise UserError(f"layers: a draft must keep fewer than the target's {target_layers} layers, got {keep}")
    if method == "early-exit":
        return list(range(keep))
    from compress.distill import evenly_spaced_layers

    return evenly_spaced_layers(target_layers, keep)


def make_draft(cfg: DraftConfig) -> Artifact:
    from compress.draft_data import chat_prompts, target_answers
    from compress.models import load_artifact_model
    from runtime.loading import load_tokenizer

    target = open_artifact(cfg.target)
    if problems := verify(target):
        raise UserError(f"refusing to use a damaged target: {problems[0]}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise UserError(f"output already exists: {cfg.out} (pass --overwrite to replace it)")
    keep = draft_layers(cfg.method, target.hf_config.get("num_hidden_layers", 0), cfg.layers)
    tokenizer = load_tokenizer(target.path)
    model = load_artifact_model(target.path).eval()
    device = "cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu"
    if device == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    data = target_answers(model, tokenizer, chat_prompts(tokenizer, "train", cfg.prompts), cfg.answer_tokens,
                          cfg.work_path, target.content_hash)
    del model
    distill_cfg = DistillConfig(
        teacher=cfg.target, out=cfg.out, init="layer-drop", keep_layers=keep, data=str(data), seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, lr=cfg.lr,
        warmup_steps=min(50, cfg.max_steps // 10), kd_weight=1.0, ce_weight=0.1,
        gradient_checkpointing=cfg.gradient_checkpointing, accelerator=cfg.accelerator, devices=cfg.devices,
        val_every=max(cfg.max_steps // 4, 1), val_windows=2, eval_windows=4, ckpt_every=max(cfg.max_steps // 4, 1),
        work_dir=str(cfg.work_path / "train"), resume=cfg.resume, seed=cfg.seed, overwrite=cfg.overwrite)
    distill_cfg.validate()
    artifact = distill(distill_cfg, kind="draft", extra={"draft": {
        "method": cfg.method, "target": target.path.name, "target_content_hash": target.content_hash,
        "target_layers": keep, "training_prompts": cfg.prompts, "answer_tokens": cfg.answer_tokens}})
    acceptance = measure_acceptance(target, artifact, tokenizer, cfg.eval_prompts, cfg.answer_tokens, cfg.k)
    held_out = artifact.manifest.get("metrics") or {}  # compress.distill's held-out perplexity / KL / top-1
    record_metrics(artifact, {**held_out.get("values", {}), **acceptance},
                   "compress.draft (held-out windows as compress.distill; acceptance on held-out chat prompts, greedy)",
                   protocol={**held_out.get("protocol", {"full": True}), "acceptance_prompts": cfg.eval_prompts,
                             "k": cfg.k})
    return open_artifact(cfg.out)


def measure_acceptance(target: Artifact, draft: Artifact, tokenizer, prompts: int, new_tokens: int, k: int
                       ) -> dict[str, float]:
    """Greedy speculative decoding of held-out chat prompts on the paged engine: the share of proposed draft
    tokens the target accepts and the tokens each target pass yields."""
    from compress.draft_data import chat_prompts, encode
    from compress.models import load_artifact_model
    from runtime.engine import Engine, SamplingParams

    target_engine = Engine(load_artifact_model(target.path).eval())
    draft_engine = Engine(load_artifact_model(draft.path).eval())
    proposed = accepted = produced = passes = 0
    for ids in encode(tokenizer, chat_prompts(tokenizer, "heldout", prompts)):
        _, stats = target_engine.speculative(draft_engine, ids, SamplingParams(max_new_tokens=new_tokens), k)
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        produced, passes = produced + stats.new_tokens, passes + stats.target_steps
    return {"acceptance_rate": accepted / max(proposed, 1), "tokens_per_target_pass": produced / max(passes, 1),
            "k": k}


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(DraftConfig, argv, "python -m compress.draft", __doc__.splitlines()[0])
    artifact = make_draft(cfg)
    metrics = artifact.manifest["metrics"]["values"]
    print(f"wrote {artifact.path} ({cfg.method}, {cfg.layers} layers): acceptance "
          f"{metrics.get('acceptance_rate', float('nan')):.3f}, {metrics.get('tokens_per_target_pass', 0):.2f} "
          f"tokens per target pass at k = {cfg.k}")


if __name__ == "__main__":
    run_main(main)
