"""A KV-sharing early-exit draft: the target's own first L layers, a small trained exit, its final norm and LM head.

LayerSkip's self-speculation without touching the target: the draft *is* the target up to layer L, so
drafting a token computes the target's first L layers for it (their K/V go straight into the target's
cache, exactly as plain decoding would write them), and verification runs only layers L.. for the
drafted tokens, from the layer-L states the draft left. The exit (`ExitHead`: a residual SwiGLU adapter
on layer L's output, `compress.draft --method exit-head`) is the only part that is trained and stored.
A rejected tail needs no clean-up: the next cycle overwrites those cache positions. `exit_early` is the
lossy use of the same exit (no verification where the exit is confident).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.family import final_logits
from runtime.eagle import WEIGHTS, draft_method
from runtime.engine import Engine, GenerationStats, SamplingParams, accept_greedy


class ExitHead(nn.Module):
    """Layer `exit_layer`'s output -> an estimate of the target's last hidden state (before its final norm)."""

    def __init__(self, hidden: int, intermediate: int, exit_layer: int, eps: float = 1e-5):
        super().__init__()
        self.exit_layer = exit_layer
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        nn.init.zeros_(self.down.weight)  # starts as the identity: the target's norm and LM head on layer L

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.norm(hidden)).chunk(2, dim=-1)
        return hidden + self.down(F.silu(gate) * up)


def exit_logits(head: ExitHead, target: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The exit's logits: the adapter, then the target's own final norm and LM head."""
    return final_logits(target, target.model.norm(head(hidden)))


def new_exit_head(target: nn.Module, exit_layer: int, intermediate: int | None = None) -> ExitHead:
    config = target.config
    if not 0 < exit_layer < config.num_hidden_layers:
        raise ValueError(f"exit layer must be in 1..{config.num_hidden_layers - 1}, got {exit_layer}")
    return ExitHead(config.hidden_size, intermediate or config.hidden_size * 2, exit_layer,
                    getattr(config, "rms_norm_eps", 1e-5))


def is_exit_head(path: str | Path) -> bool:
    return draft_method(path) == "exit-head"


def load_exit_head(path: str | Path, target: nn.Module) -> ExitHead:
    """The exit of an `exit-head` draft artifact, on the target's device and dtype."""
    from safetensors.torch import load_file

    made = json.loads((Path(path) / "shrinkwrap.json").read_text(encoding="utf-8"))["draft"]
    head = new_exit_head(target, made["exit_layer"], made["intermediate"])
    head.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    weight = target.lm_head.weight
    return head.to(device=weight.device, dtype=weight.dtype).eval()


def _parts(engine: Engine, head: ExitHead, params: SamplingParams, what: str) -> tuple:
    """The runner, target, its inner model, and the layer ranges before and from the exit (greedy only)."""
    if params.temperature > 0:
        raise ValueError(f"{what} with an exit head is greedy (temperature 0)")
    target = engine.runner.model
    layers = target.config.num_hidden_layers
    return engine.runner, target, target.model, range(head.exit_layer), range(head.exit_layer, layers)


def _prefill(engine: Engine, prompt: list[int]) -> tuple:
    """The prompt through every layer: its sequence, the first (greedy) token, stats with the prefill time."""
    stats = GenerationStats(prompt_tokens=len(prompt))
    (seq,) = engine._start([prompt])
    start = time.perf_counter()
    out = [int(engine.runner.forward([seq], last_only=True)[0][-1].argmax())]
    stats.prefill_s = time.perf_counter() - start
    return seq, out, stats


def draft_with_exit(runner, head: ExitHead, seq, first: int, count: int) -> tuple[list[int], torch.Tensor]:
    """The exit's `count` greedy proposals after the token at position `first` (in no layer's cache yet): the
    target's first L layers run for it and for each proposal (their K/V enter those layers' cache) ->
    the proposals and the count + 1 layer-L states (1, count + 1, hidden) the verify pass starts from.
    `seq.tokens` is not extended."""
    target, inner = runner.model, runner.model.model
    tokens, states = [seq.tokens[first]], []
    for i in range(count + 1):  # count drafts, then the last proposal's first layers for the verify pass
        x = inner.embed_tokens(torch.tensor([[tokens[i]]], device=runner.device))
        states.append(runner.run_layers(seq, first + i, first + i + 1, x, range(head.exit_layer)))
        if i < count:
            tokens.append(int(exit_logits(head, target, states[-1][0, -1]).argmax()))
    return tokens[1:], torch.cat(states, dim=1)


def verify_from_exit(runner, head: ExitHead, seq, first: int, states: torch.Tensor) -> torch.Tensor:
    """The target's logits (n, vocab) at positions first.. from their layer-L states: layers L.. only."""
    target = runner.model
    deep = range(head.exit_layer, target.config.num_hidden_layers)
    hidden = runner.run_layers(seq, first, first + states.shape[1], states, deep)
    return final_logits(target, target.model.norm(hidden)[0])


@torch.inference_mode()
def self_speculative(engine: Engine, head: ExitHead, prompt: list[int], params: SamplingParams, k: int = 3
                     ) -> tuple[list[int], GenerationStats]:
    """Greedy self-speculative decoding on the paged engine: the target's own first L layers + the exit draft k
    tokens, the target's remaining layers verify them (with the token after the last) in one pass."""
    _parts(engine, head, params, "self-speculative decoding")
    seq, out, stats = _prefill(engine, prompt)
    start = time.perf_counter()
    while out[-1] not in params.stop_ids and len(out) < params.max_new_tokens:
        first = len(seq.tokens)  # the position of the newest token, not in any layer's cache yet
        seq.tokens.append(out[-1])
        proposals, states = draft_with_exit(engine.runner, head, seq, first, k)
        seq.tokens.extend(proposals)
        verified = verify_from_exit(engine.runner, head, seq, first, states).argmax(-1).tolist()
        accepted, final = accept_greedy(proposals, verified)
        stats.target_steps += 1
        stats.proposed += k
        stats.accepted += accepted
        stats.per_step_accepted.append(accepted)
        engine.pool.truncate(seq, first + 1 + accepted)
        seq.cached = first + 1 + accepted  # every layer holds the accepted tokens now
        out.extend(proposals[:accepted] + [final])
        if any(t in params.stop_ids for t in out):
            out = out[:next(i for i, t in enumerate(out) if t in params.stop_ids) + 1]
    out = out[:params.max_new_tokens]
    stats.decode_s = time.perf_counter() - start
    stats.new_tokens = len(out)
    engine.pool.free_sequence(seq)
    return out, stats


@torch.inference_mode()
def exit_early(engine: Engine, head: ExitHead, prompt: list[int], params: SamplingParams, threshold: float
               ) -> tuple[list[int], GenerationStats]:
    """Lossy early exit with the target's own layers (`runtime.generate --early-exit-threshold p`): every token
    runs the first L layers and the exit; where the exit's top probability is >= `threshold` its token is
    emitted, else the remaining layers run for it and for every exited token since the last such pass (their
    layer-L states kept), so the target's cache catches up as plain decoding would have filled it."""
    runner, target, inner, shallow, deep = _parts(engine, head, params, "early exit")
    seq, out, stats = _prefill(engine, prompt)
    start = time.perf_counter()
    pending: list[torch.Tensor] = []  # layer-L states of the tokens whose later layers have not run
    while out[-1] not in params.stop_ids and len(out) < params.max_new_tokens:
        position = len(seq.tokens)
        seq.tokens.append(out[-1])
        x = inner.embed_tokens(torch.tensor([[out[-1]]], device=runner.device))
        pending.append(runner.run_layers(seq, position, position + 1, x, shallow))
        confidence, token = torch.softmax(exit_logits(head, target, pending[-1][0, -1]), -1).max(-1)
        if confidence.item() >= threshold:
            stats.exited += 1
            out.append(int(token))
            continue
        hidden = runner.run_layers(seq, position + 1 - len(pending), position + 1, torch.cat(pending, dim=1), deep)
        out.append(int(final_logits(target, inner.norm(hidden[0, -1:]))[0].argmax()))
        stats.target_steps += 1
        pending = []
        seq.cached = len(seq.tokens)
    stats.decode_s = time.perf_counter() - start
    stats.new_tokens = len(out)
    engine.pool.free_sequence(seq)
    return out, stats
