"""`python -m compress.speed`: time one artifact in a process of its own (so peak RSS is its own).

Prefill tokens/s on a 512-token prompt; time to first token and decode tokens/s (greedy, fixed
number of new tokens) at batch 1 and batch 8 on chat prompts from the held-out articles.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from compress.models import load_artifact_model, load_tokenizer
from core.config import field, parse_config
from core.data import chat_prompts, heldout_windows
from core.errors import UserError, run_main


@dataclass
class SpeedConfig:
    artifact: str = field(None, help="artifact directory to time")
    device: str = field("cpu", help="cpu or cuda")
    threads: int | None = field(None, help="torch intra-op threads (default: torch's choice)")
    new_tokens: int = field(128, help="greedy tokens generated per decode measurement")
    prefill_tokens: int = field(512, help="prompt length for the prefill measurement")
    repeats: int = field(2, help="timed repeats per measurement (the fastest is kept)")

    def validate(self) -> None:
        if not self.artifact:
            raise UserError("artifact: required")
        if self.new_tokens < 2 or self.prefill_tokens < 1 or self.repeats < 1:
            raise UserError("new_tokens must be >= 2, prefill_tokens and repeats >= 1")


def peak_rss_mb() -> float:
    """This process's own RSS high-water mark (VmHWM). ru_maxrss is not used: Linux carries the
    parent's peak into a forked child, so a child of a big evaluate process would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _generate_timer(model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int):
    def run(n: int) -> torch.Tensor:
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id)
    return run


def measure_onnx_speed(cfg: SpeedConfig) -> dict[str, Any]:
    """The same measurements through ONNX Runtime (batch 1: the exported decoder serves one stream)."""
    import numpy as np

    from runtime.engine import SamplingParams
    from runtime.onnx_backend import OnnxEngine

    tokenizer = load_tokenizer(cfg.artifact)
    engine = OnnxEngine(cfg.artifact, threads=cfg.threads)
    decoder = engine.decoder
    prompt = heldout_windows(tokenizer, seq_len=cfg.prefill_tokens)[:1].numpy()
    decoder.forward(prompt[:, :16], decoder.new_cache(1, 16), 0)  # warm-up
    prefill_s = _best_time(lambda: decoder.forward(prompt, decoder.new_cache(1, prompt.shape[1]), 0),
                           cfg.repeats, torch.device("cpu"))
    chat = tokenizer(chat_prompts(tokenizer, 1))["input_ids"]

    def run(n: int) -> None:
        engine.generate(chat, SamplingParams(max_new_tokens=n))

    run(2)
    print(f"  decode at batch 1: {cfg.repeats} x {cfg.new_tokens} tokens ...", file=sys.stderr, flush=True)
    first = _best_time(lambda: run(1), cfg.repeats, torch.device("cpu"))
    full = _best_time(lambda: run(cfg.new_tokens), cfg.repeats, torch.device("cpu"))
    return {"prefill_tok_s": cfg.prefill_tokens / prefill_s, "device": "cpu", "backend": "onnxruntime",
            "threads": decoder.session.get_session_options().intra_op_num_threads, "new_tokens": cfg.new_tokens,
            "decode_tok_s_b1": (cfg.new_tokens - 1) / max(full - first, 1e-9), "decode_tok_s_b8": None,
            "ttft_ms": first * 1000, "prompt_tokens_b1": int(np.asarray(chat).shape[1]),
            "peak_rss_mb": peak_rss_mb(), "repeats": cfg.repeats,
            "timings_note": "fastest of repeats; decode excludes the first token; batch 8 not measured for ONNX"}


@torch.inference_mode()
def measure_speed(cfg: SpeedConfig) -> dict[str, Any]:
    from runtime.loading import is_onnx_export

    if is_onnx_export(cfg.artifact, cfg.device):
        return measure_onnx_speed(cfg)
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg.artifact)
    tokenizer.padding_side = "left"
    model = load_artifact_model(cfg.artifact, device=device)
    if tokenizer.pad_token is None:  # batched prompts need one (newer transformers no longer set it for SmolLM2)
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id

    prompt = heldout_windows(tokenizer, seq_len=cfg.prefill_tokens)[:1].to(device)
    model(prompt[:, :16], use_cache=True)  # warm-up
    print(f"  prefill {cfg.prefill_tokens} tokens x {cfg.repeats} ...", file=sys.stderr, flush=True)
    prefill_s = _best_time(lambda: model(prompt, use_cache=True), cfg.repeats, device)

    result: dict[str, Any] = {"prefill_tok_s": cfg.prefill_tokens / prefill_s, "device": str(device),
                              "threads": torch.get_num_threads(), "new_tokens": cfg.new_tokens}
    for batch_size in (1, 8):
        print(f"  decode at batch {batch_size}: {cfg.repeats} x {cfg.new_tokens} tokens ...", file=sys.stderr, flush=True)
        batch = tokenizer(chat_prompts(tokenizer, batch_size), return_tensors="pt", padding=True).to(device)
        run = _generate_timer(model, dict(batch), pad_id)
        run(2)  # warm-up
        first = _best_time(lambda run=run: run(1), cfg.repeats, device)
        full = _best_time(lambda run=run: run(cfg.new_tokens), cfg.repeats, device)
        decode_s = max(full - first, 1e-9)
        result[f"decode_tok_s_b{batch_size}"] = batch_size * (cfg.new_tokens - 1) / decode_s
        if batch_size == 1:
            result["ttft_ms"] = first * 1000
            result["prompt_tokens_b1"] = int(batch["input_ids"].shape[1])
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["repeats"] = cfg.repeats
    result["timings_note"] = "fastest of repeats; decode excludes the first token"
    return result


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(SpeedConfig, argv, "python -m compress.speed", __doc__.splitlines()[0])
    print(json.dumps({"config": asdict(cfg), "speed": measure_speed(cfg)}))


if __name__ == "__main__":
    run_main(main)
