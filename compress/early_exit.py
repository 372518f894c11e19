"""Lossy early exit's accuracy against its speed, per threshold (`compress.evaluate --early-exit DRAFT`).

`runtime.generate --early-exit-threshold p` emits the exit model's token without the target wherever the
exit model's top probability is >= p (an early-exit or layers draft: a separate model; an exit head: the
target's own first L layers and the exit). Accuracy is measured teacher-forced on the held-out windows, the
same tokens as every other row of the report: at each position the exit model's distribution stands in
for the target's where the token would exit, so perplexity, KL(target || emitted) and top-1 agreement
are those of what early exit emits (`exit_rate`: the share of positions that exit). Speed: greedy
decoding of held-out chat prompts to the end of the answer with `Engine.early_exit` at each threshold,
interleaved per prompt with the target alone on the same engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm


@torch.inference_mode()
def exit_accuracy(target: torch.nn.Module, exit_logits: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor,
                  thresholds: list[float]) -> list[dict[str, float]]:
    """Per threshold: exit rate, perplexity, KL(target || emitted), top-1 agreement with the target.
    `exit_logits`: token ids (1, T) -> the exit's logits (1, T, vocab)."""
    sums = {t: {"nll": 0.0, "kl": 0.0, "agree": 0, "exited": 0} for t in thresholds}
    count = 0
    for window in tqdm(windows, desc="early exit (windows)", unit="win"):
        ids = window[None]
        targets = ids[0, 1:, None]
        ref_logp = torch.log_softmax(target(ids).logits[0, :-1].float(), -1)
        exit_logp = torch.log_softmax(exit_logits(ids)[0, :-1].float(), -1)
        confidence = exit_logp.max(-1).values.exp()
        ref_p, ref_top1 = ref_logp.exp(), ref_logp.argmax(-1)
        count += targets.shape[0]
        for t in thresholds:
            exits = confidence >= t
            logp = torch.where(exits[:, None], exit_logp, ref_logp)
            s = sums[t]
            s["nll"] += -logp.gather(1, targets).sum().item()
            s["kl"] += (ref_p * (ref_logp - logp)).sum().item()
            s["agree"] += (logp.argmax(-1) == ref_top1).sum().item()
            s["exited"] += int(exits.sum())
    return [{"threshold": t, "exit_rate": s["exited"] / count, "perplexity": math.exp(s["nll"] / count),
             "kl": max(s["kl"], 0.0) / count, "top1_agreement": s["agree"] / count, "tokens": count}
            for t, s in sums.items()]


@torch.inference_mode()
def exit_speed(target_path: str, exit_path: str, tokenizer: Any, thresholds: list[float], prompts: int,
               new_tokens: int, device: str) -> dict[str, Any]:
    """Decode tok/s of the target alone and at each threshold (greedy, held-out chat prompts, interleaved)."""
    from compress.draft_data import chat_prompts, encode
    from runtime.engine import Engine, SamplingParams
    from runtime.exit_head import exit_early, is_exit_head, load_exit_head
    from runtime.loading import load_model

    target = Engine(load_model(target_path, device))
    params = SamplingParams(max_new_tokens=new_tokens,
                            stop_ids=tuple(t for t in (tokenizer.eos_token_id,) if t is not None))
    if is_exit_head(exit_path):  # the target's own first layers and the exit
        head = load_exit_head(exit_path, target.runner.model)

        def run(ids: list[int], threshold: float):
            return exit_early(target, head, ids, params, threshold)
    else:
        exit_engine = Engine(load_model(exit_path, device))

        def run(ids: list[int], threshold: float):
            return target.early_exit(exit_engine, ids, params, threshold)
    times = {t: [0.0, 0, 0, 0] for t in ["target", *thresholds]}  # decode s, tokens timed, exited, generated
    encoded = encode(tokenizer, chat_prompts(tokenizer, "heldout", prompts))
    target.generate([encoded[0]], params)  # warm-up outside the timing (a GPU's first kernels compile)
    run(encoded[0], thresholds[0])
    for ids in tqdm(encoded, desc="early exit (speed)"):
        (out,), stats = target.generate([ids], params)
        runs = [("target", stats)] + [(t, run(ids, t)[1]) for t in thresholds]
        for key, s in runs:
            row = times[key]
            row[0] += s.decode_s
            row[1] += s.new_tokens - 1  # the first token comes from the prefill
            row[2] += s.exited
            row[3] += s.new_tokens
    rate = {key: row[1] / max(row[0], 1e-9) for key, row in times.items()}
    return {"target_tok_s": rate["target"], "prompts": prompts, "new_tokens": new_tokens, "device": device,
            "per_threshold": {t: {"tok_s": rate[t], "speedup": rate[t] / rate["target"],
                                  "generated_exit_rate": times[t][2] / max(times[t][3], 1)} for t in thresholds}}


def markdown(curve: dict[str, Any]) -> str:
    speed = curve.get("speed")
    lines = [f"Early exit with `{curve['draft']}` (lossy; `runtime.generate --early-exit-threshold p`):", "",
             "| threshold p | exit rate | ppl | KL | top-1 | decode tok/s | × target alone |", "|---" * 7 + "|"]
    for row in curve["accuracy"]:
        s = speed["per_threshold"][row["threshold"]] if speed else None
        rate, ratio = (format(s["tok_s"], ".1f"), format(s["speedup"], ".2f") + "×") if s else ("–", "–")
        lines.append(f"| {row['threshold']} | {row['exit_rate']:.3f} | {row['perplexity']:.2f} | {row['kl']:.4f} | "
                     f"{row['top1_agreement']:.3f} | {rate} | {ratio} |")
    if speed:
        lines += ["", f"Target alone: {speed['target_tok_s']:.1f} tok/s ({speed['prompts']} held-out chat prompts, "
                  f"greedy to the end of the answer, at most {speed['new_tokens']} tokens, {speed['device']})."]
    return "\n".join(lines) + "\n"
