"""TensorRT-LLM engines (built by `build.sh` from a `tensorrt-llm` artifact) behind our runtime.

`TrtllmEngine.generate` runs an engine directory through TensorRT-LLM's C++ runner
(`tensorrt_llm.runtime.ModelRunnerCpp`: in-flight batching and the paged KV cache live inside it),
with the same inputs and results as our other engines. Where `tensorrt_llm` does not import, every
entry point stops with one line saying what to install.

Not executed here: no machine of this project has TensorRT-LLM (it needs a GPU and a multi-GB
wheel the GPU machine cannot receive). `bench/trtllm_stage.sh` exercises it where it exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from runtime.engine import GenerationStats, SamplingParams
from runtime.errors import UserError

INSTALL = ("TensorRT-LLM engines need tensorrt_llm: pip install tensorrt-llm==1.2.1 on a machine with an NVIDIA GPU "
           "(1.2.x is the last release that builds and runs TensorRT engines)")


def is_trtllm_engine(path: str | Path) -> bool:
    """An engine directory as trtllm-build writes it: config.json with a build_config, and rank*.engine."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file() or not any(path.glob("rank*.engine")):
        return False
    try:
        return "build_config" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def import_trtllm() -> Any:
    try:
        import tensorrt_llm
    except ImportError:
        raise UserError(INSTALL) from None
    return tensorrt_llm


class TrtllmEngine:
    """Generation on a built engine; same signature and stats as `Engine.generate` (greedy or sampled)."""

    def __init__(self, path: str | Path, max_batch_size: int | None = None):
        import_trtllm()
        from tensorrt_llm.runtime import ModelRunnerCpp  # pragma: no cover - needs TensorRT-LLM

        self.path = Path(path)  # pragma: no cover
        build = json.loads((self.path / "config.json").read_text())["build_config"]  # pragma: no cover
        self.max_batch_size = max_batch_size or build.get("max_batch_size", 8)  # pragma: no cover
        self.runner = ModelRunnerCpp.from_dir(engine_dir=str(self.path), rank=0,  # pragma: no cover
                                              max_batch_size=self.max_batch_size)

    def generate(self, prompts: list[list[int]], params: SamplingParams
                 ) -> tuple[list[list[int]], GenerationStats]:  # pragma: no cover - needs TensorRT-LLM
        import torch

        stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        end_id = params.stop_ids[0] if params.stop_ids else -1
        outputs: list[list[int]] = []
        start = time.perf_counter()
        for first in range(0, len(prompts), self.max_batch_size):
            batch = prompts[first:first + self.max_batch_size]
            result = self.runner.generate(
                batch_input_ids=[torch.tensor(p, dtype=torch.int32) for p in batch],
                max_new_tokens=params.max_new_tokens, end_id=end_id, pad_id=end_id if end_id >= 0 else 0,
                temperature=params.temperature if params.temperature > 0 else 1.0,
                top_k=1 if params.temperature <= 0 else (params.top_k or 0), top_p=params.top_p,
                random_seed=params.seed, return_dict=True, output_sequence_lengths=True)
            ids, lengths = result["output_ids"], result["sequence_lengths"]
            for i, prompt in enumerate(batch):
                out = ids[i, 0, len(prompt):int(lengths[i, 0])].tolist()
                cut = next((j + 1 for j, t in enumerate(out) if t in params.stop_ids), len(out))
                outputs.append(out[:cut])
        stats.decode_s = time.perf_counter() - start  # prefill and decode together: the runner does both
        stats.new_tokens = sum(map(len, outputs))
        return outputs, stats
