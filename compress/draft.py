"""`python -m compress.draft`: a speculative-decoding draft made for one target, from the target's own answers.

Methods:
- `eagle`: a one-layer head on the target's final hidden state and the next token's embedding (EAGLE),
  sharing the target's embedding and LM head (`--draft-vocab N`: the head proposes only the N tokens most
  frequent in the target's answers), trained with our Lightning trainer (train/eagle.py);
- `early-exit`: the target's first L layers with its final norm and LM head (LayerSkip's draft), then
  trained to match the target's final distribution (forward KL) on the target's chat answers;
- `layers`: L layers spread evenly over the target (today's layer-drop student), for comparison;
- `exit-head`: the KV-sharing early exit: the target's own first L layers (not copied: the draft's K/V
  are the target's), a trained exit adapter (`runtime/exit_head.py`, `train/exit_head.py`) and the
  target's final norm and LM head; verification runs only layers L.. (greedy, the paged engine).

Both are distilled with our Lightning trainer (`compress.distill`: gradient checkpointing, resume,
`--max-minutes`, `--devices`) on chat prompts from the train split followed by the target's greedy
answers (`compress.draft_data`, cached by the target's content hash). The result is a `draft`
artifact whose parent is the target (by content hash: `runtime.generate --draft` and `runtime.serve
--draft` refuse it for another target unless `--force`) and whose manifest holds the acceptance
measured on held-out chat prompts (greedy, `k` tokens per proposal, the paged engine).
Not built yet (issue 19): tree drafting.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.artifact import Artifact, open_artifact, record_metrics, verify
from compress.distill import DistillConfig, distill
from core.config import field, parse_config
from core.errors import UserError, run_main

METHODS = ("eagle", "early-exit", "layers", "exit-head")
HEADS = ("eagle", "exit-head")  # trained on the frozen target, stored without its layers


@dataclass
class DraftConfig:
    target: str = field("artifacts/reference", help="the artifact the draft proposes tokens for")
    method: str = field("eagle", help="eagle: a head on the target's hidden state; early-exit: the target's first "
                        "L layers; layers: L layers spread evenly; exit-head: the target's own first L layers and "
                        "a trained exit, sharing its KV cache", choices=METHODS)
    out: str = field("artifacts/draft", help="output draft artifact")
    layers: int | None = field(None, help="L: decoder layers the draft keeps (default 4; eagle: the head's layers, "
                               "default 1; exit-head: the exit layer, default 8)")
    draft_vocab: int = field(0, help="eagle: propose only the N tokens most frequent in the target's answers "
                             "(0: the whole vocabulary)")
    feature_weight: float = field(1.0, help="eagle, exit-head: weight of the feature regression (smooth L1)")
    kl_weight: float = field(0.1, help="eagle, exit-head: weight of KL(target || head) on the next token")
    feature_noise: float = field(0.0, help="eagle: uniform noise of this half-width added to input features")
    unroll: int = field(1, help="eagle: train on the head's own predicted features fed back this many steps "
                        "(EAGLE-3's training-time test; 1: teacher features only)")
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
        if self.layers is None:
            self.layers = {"eagle": 1, "exit-head": 8}.get(self.method, 4)
        for name in ("layers", "unroll", "prompts", "answer_tokens", "eval_prompts", "k", "seq_len", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive")
        if min(self.feature_weight, self.kl_weight, self.feature_noise) < 0 or not (self.feature_weight or
                                                                                     self.kl_weight):
            raise UserError("feature_weight, kl_weight, feature_noise: >= 0, one of the weights positive")
        if self.draft_vocab < 0 or (self.draft_vocab and self.method != "eagle"):
            raise UserError("draft_vocab: a positive token count, with --method eagle only")

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

    cfg.validate()
    target = open_artifact(cfg.target)
    if problems := verify(target):
        raise UserError(f"refusing to use a damaged target: {problems[0]}")
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise UserError(f"output already exists: {cfg.out} (pass --overwrite to replace it)")
    keep = ([] if cfg.method in HEADS else
            draft_layers(cfg.method, target.hf_config.get("num_hidden_layers", 0), cfg.layers))
    if cfg.method == "exit-head" and cfg.layers >= target.hf_config.get("num_hidden_layers", 0):
        raise UserError(f"layers: the exit layer must be below the target's "
                        f"{target.hf_config.get('num_hidden_layers')} layers, got {cfg.layers}")
    tokenizer = load_tokenizer(target.path)
    model = load_artifact_model(target.path).eval()
    device = "cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu"
    if device == "cuda":
        model = model.to(device=device, dtype=torch.bfloat16)
    data = target_answers(model, tokenizer, chat_prompts(tokenizer, "train", cfg.prompts), cfg.answer_tokens,
                          cfg.work_path, target.content_hash)
    if cfg.method in HEADS:
        artifact = train_head(cfg, target, model.float().cpu(), tokenizer, data)
    else:
        del model
        artifact = _distill_draft(cfg, target, keep, data)
    acceptance = measure_acceptance(target, artifact, tokenizer, cfg.eval_prompts, cfg.answer_tokens, cfg.k)
    held_out = artifact.manifest.get("metrics") or {}  # the training's held-out measurement
    record_metrics(artifact, {**held_out.get("values", {}), **acceptance},
                   "compress.draft (held-out windows as the training step; acceptance on held-out chat prompts, "
                   "greedy)", protocol={**held_out.get("protocol", {"full": True}), "acceptance_prompts":
                                        cfg.eval_prompts, "k": cfg.k})
    return open_artifact(cfg.out)


def _trainer_config(cfg: DraftConfig, data: Path, keep: list[int]) -> DistillConfig:
    distill_cfg = DistillConfig(
        teacher=cfg.target, out=cfg.out, init="layer-drop", keep_layers=keep, data=str(data), seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes, lr=cfg.lr,
        warmup_steps=min(50, cfg.max_steps // 10), kd_weight=1.0, ce_weight=0.1,
        gradient_checkpointing=cfg.gradient_checkpointing, accelerator=cfg.accelerator, devices=cfg.devices,
        val_every=max(cfg.max_steps // 4, 1), val_windows=2, eval_windows=4, ckpt_every=max(cfg.max_steps // 4, 1),
        work_dir=str(cfg.work_path / "train"), resume=cfg.resume, seed=cfg.seed, overwrite=cfg.overwrite)
    distill_cfg.validate()
    return distill_cfg


def _made_for(cfg: DraftConfig, target: Artifact, keep: list[int]) -> dict:
    return {"method": cfg.method, "target": target.path.name, "target_content_hash": target.content_hash,
            "target_layers": keep, "training_prompts": cfg.prompts, "answer_tokens": cfg.answer_tokens}


def _distill_draft(cfg: DraftConfig, target: Artifact, keep: list[int], data: Path) -> Artifact:
    return distill(_trainer_config(cfg, data, keep), kind="draft", extra={"draft": _made_for(cfg, target, keep)})


def frequent_tokens(tokenizer, data: Path, count: int) -> torch.Tensor:
    """The `count` token ids most frequent in the training text (ties to the lower id), ascending."""
    counts = torch.zeros(len(tokenizer), dtype=torch.long)
    with data.open(encoding="utf-8") as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(tokenizer))
    if count >= len(tokenizer):
        raise UserError(f"draft_vocab: {count} is not smaller than the vocabulary ({len(tokenizer)})")
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    return torch.tensor(sorted(order[:count]), dtype=torch.long)


def train_head(cfg: DraftConfig, target: Artifact, model: torch.nn.Module, tokenizer, data: Path) -> Artifact:
    """Train an EAGLE head (train/eagle.py) or an exit head (train/exit_head.py) on the target's answers, the target
    frozen, and write it alone as a `draft` artifact."""
    import time

    import lightning as L
    from safetensors.torch import save_file

    from compress.artifact import write_artifact
    from compress.distill import jsonable, lightning_trainer
    from runtime.eagle import WEIGHTS, new_head
    from runtime.exit_head import new_exit_head
    from train.datamodule import DistillDataModule
    from train.distillation import OptimConfig
    from train.eagle import EagleModule
    from train.exit_head import ExitModule

    tcfg = _trainer_config(cfg, data, [])
    last = tcfg.work_path / "checkpoints" / "last.ckpt"
    if cfg.resume and not last.is_file():
        raise UserError(f"resume: no checkpoint at {last}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    optim = OptimConfig(cfg.lr, 0.0, tcfg.warmup_steps, cfg.max_steps)
    if cfg.method == "eagle":
        vocab_ids = frequent_tokens(tokenizer, data, cfg.draft_vocab) if cfg.draft_vocab else None
        head = new_head(model, cfg.layers, vocab_ids)
        module = EagleModule(head, model, optim, cfg.feature_weight, cfg.kl_weight, cfg.feature_noise,
                             cfg.gradient_checkpointing, cfg.unroll)
        made = {"head_layers": cfg.layers, "draft_vocab": 0 if vocab_ids is None else len(vocab_ids)}
        description = (f"EAGLE head ({cfg.layers} layer) for `{target.path.name}`: load it with the target "
                       "(runtime.eagle.load_head); it holds no embedding or LM head of its own.")
    else:
        head = new_exit_head(model, cfg.layers)
        module = ExitModule(head, model, optim, cfg.feature_weight, cfg.kl_weight)
        made = {"exit_layer": cfg.layers, "intermediate": head.down.in_features}
        description = (f"Exit head after layer {cfg.layers} of `{target.path.name}`: the draft is the target's own "
                       "first layers plus this exit (runtime.exit_head.load_exit_head); it holds no layer of the "
                       "target.")
    datamodule = DistillDataModule(tokenizer, cfg.seq_len, cfg.batch_size, str(data), "text", tcfg.val_windows,
                                   None, cfg.seed, 1)
    trainer = lightning_trainer(tcfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if cfg.resume else None)
    seconds = time.perf_counter() - start
    head = module.head.float().cpu().eval()
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    info = {"steps": trainer.global_step, "train_seconds": round(seconds, 1),
            "train_tokens": trainer.global_step * cfg.batch_size * cfg.seq_len, "work_dir": str(cfg.work_path),
            "val_top1": logged.get("val/top1")}
    state = head.trained_state() if cfg.method == "eagle" else head.state_dict()
    with write_artifact(cfg.out, "draft", "compress.draft", jsonable(cfg), parent=target, overwrite=cfg.overwrite,
                        extra={"draft": {**_made_for(cfg, target, []), **made}, "training": info,
                               "description": description}) as tmp:
        # bf16: half the bytes, and the head runs in the target's dtype (bf16 on a GPU) anyway
        save_file({k: v.to(torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in state.items()}, str(tmp / WEIGHTS))
        if cfg.method == "eagle":
            head.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    artifact = open_artifact(cfg.out)
    if info["val_top1"] is not None:
        record_metrics(artifact, {"draft_top1": info["val_top1"]},
                       "compress.draft (the head's top-1 agreement with the target's next token, held-out windows)")
    return open_artifact(cfg.out)


def measure_acceptance(target: Artifact, draft: Artifact, tokenizer, prompts: int, new_tokens: int, k: int
                       ) -> dict[str, float]:
    """Greedy speculative decoding of held-out chat prompts on the paged engine, each to the end of its answer
    (what a chat user gets; past it the target rambles and no draft follows): the share of proposed draft
    tokens the target accepts and the tokens each target pass yields."""
    from compress.draft_data import chat_prompts, encode
    from compress.models import load_artifact_model
    from runtime.eagle import EagleDraft, is_eagle_draft, load_head
    from runtime.engine import Engine, SamplingParams
    from runtime.exit_head import is_exit_head, load_exit_head, self_speculative

    model = load_artifact_model(target.path).eval()
    target_engine = Engine(model)
    eagle, exit_head = is_eagle_draft(draft.path), is_exit_head(draft.path)
    draft_engine = None if eagle or exit_head else Engine(load_artifact_model(draft.path).eval())
    head = load_head(draft.path, model) if eagle else load_exit_head(draft.path, model) if exit_head else None
    proposed = accepted = produced = passes = 0
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    for ids in encode(tokenizer, chat_prompts(tokenizer, "heldout", prompts)):
        params = SamplingParams(max_new_tokens=new_tokens, stop_ids=stop)
        if exit_head:
            _, stats = self_speculative(target_engine, head, ids, params, k)
        else:
            drafter = EagleDraft(head, target_engine.runner) if eagle else draft_engine
            _, stats = target_engine.speculative(drafter, ids, params, k)
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
