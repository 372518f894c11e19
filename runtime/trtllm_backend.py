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

from core.errors import UserError
from runtime.engine import GenerationStats, SamplingParams

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

    def __init__(self, path: str | Path, max_batch_size: int | None = None, speculative: bool = False):
        import_trtllm()
        from tensorrt_llm.runtime import ModelRunnerCpp  # pragma: no cover - needs TensorRT-LLM

        self.path = Path(path)  # pragma: no cover
        build = json.loads((self.path / "config.json").read_text())["build_config"]  # pragma: no cover
        self.max_batch_size = max_batch_size or build.get("max_batch_size", 8)  # pragma: no cover
        # draft-target decoding re-sends the growing prefix each cycle: reused KV blocks make that cheap
        extra = {"kv_cache_enable_block_reuse": True, "is_orchestrator_mode": True} if speculative else {}
        self.runner = ModelRunnerCpp.from_dir(engine_dir=str(self.path), rank=0,  # pragma: no cover
                                              max_batch_size=self.max_batch_size, **extra)

    def speculative(self, draft: TrtllmEngine, prompt: list[int], params: SamplingParams, k: int = 4
                    ) -> tuple[list[int], GenerationStats]:  # pragma: no cover - needs TensorRT-LLM
        """Greedy draft-target decoding between two engines (the target built with --max-draft-len >= k):
        the draft proposes k tokens, the target checks them in one pass (`draft_tokens_list`) and returns
        the accepted ones plus its own next token; the prefix grows and both runners reuse its KV blocks."""
        import torch

        if params.temperature > 0:
            raise UserError("draft: engine draft-target decoding here is greedy (temperature 0)")
        end_id = params.stop_ids[0] if params.stop_ids else -1
        common = {"end_id": end_id, "pad_id": max(end_id, 0), "top_k": 1, "return_dict": True,
                  "output_sequence_lengths": True}
        stats = GenerationStats(prompt_tokens=len(prompt))
        prefix, out = list(prompt), []
        start = time.perf_counter()
        while len(out) < params.max_new_tokens:
            room = params.max_new_tokens - len(out)
            d = draft.runner.generate(batch_input_ids=[torch.tensor(prefix, dtype=torch.int32)],
                                      max_new_tokens=min(k, room), **common)
            proposed = d["output_ids"][0, 0, len(prefix):int(d["sequence_lengths"][0, 0])].tolist() or [end_id]
            t = self.runner.generate(batch_input_ids=[torch.tensor(prefix, dtype=torch.int32)],
                                     max_new_tokens=min(len(proposed) + 1, room), draft_tokens_list=[proposed],
                                     **common)
            new = t["output_ids"][0, 0, len(prefix):int(t["sequence_lengths"][0, 0])].tolist()
            if not new:
                break
            accepted = next((i for i, (a, b) in enumerate(zip(proposed, new, strict=False)) if a != b),
                            min(len(proposed), len(new)))
            stats.target_steps += 1
            stats.proposed += len(proposed)
            stats.accepted += accepted
            out += new
            prefix += new
            if any(tok in params.stop_ids for tok in new):
                out = out[: next(i for i, tok in enumerate(out) if tok in params.stop_ids) + 1]
                break
        stats.decode_s = time.perf_counter() - start
        out = out[: params.max_new_tokens]
        stats.new_tokens = len(out)
        return out, stats

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


class TrtllmScheduler:  # pragma: no cover - needs TensorRT-LLM and a GPU
    """The scheduler interface the server uses (submit, cancel, start, stop, stats), over TensorRT-LLM's
    Executor: in-flight batching, the paged KV cache and streaming happen inside it. Logprobs, echo and
    logit_bias are refused per request (the executor does not hand back what they need here)."""

    def __init__(self, engine_dir: str | Path, max_context: int, max_queue: int = 64):
        import tensorrt_llm.bindings.executor as trtllm

        from runtime.metrics import PoolCounters
        from runtime.requests import SchedulerStats

        self.trtllm = trtllm
        self.executor = trtllm.Executor(Path(engine_dir), trtllm.ModelType.DECODER_ONLY, trtllm.ExecutorConfig(1))
        self.max_context, self.max_queue = max_context, max_queue
        self.stats, self.draft, self.running, self.waiting = SchedulerStats(), None, [], []
        self.pool = PoolCounters()  # the executor keeps its own pool
        self.live: dict[int, tuple[Any, int]] = {}  # executor request id -> (our Request, sample index)
        self._stop = False
        self._thread = None

    @property
    def queue_depth(self) -> int:
        return 0

    def submit(self, request: Any) -> None:
        from runtime.requests import QueueFull

        p = request.params
        if request.logprobs is not None or request.prompt_logprobs or p.logit_bias:
            raise ValueError("logprobs: logprobs, echo and logit_bias are not served from a TensorRT-LLM engine")
        if len(request.prompt) + p.max_new_tokens > self.max_context:
            raise ValueError(f"max_tokens: prompt + max_tokens exceeds the context ({self.max_context})")
        if len(self.live) + request.n > self.max_queue:
            raise QueueFull(f"queue full ({self.max_queue} in flight)")
        request.start()
        end_id = p.stop_ids[0] if p.stop_ids else -1
        for index in range(request.n):
            sampling = self.trtllm.SamplingConfig(
                beam_width=1, top_k=1 if p.temperature <= 0 else (p.top_k or None),
                top_p=None if p.temperature <= 0 else p.top_p,
                temperature=None if p.temperature <= 0 else p.temperature,
                seed=None if p.seed is None else (p.seed + index) % 2**63,
                presence_penalty=p.presence_penalty or None, frequency_penalty=p.frequency_penalty or None)
            rid = self.executor.enqueue_request(self.trtllm.Request(
                input_token_ids=list(request.prompt), max_tokens=p.max_new_tokens, streaming=True,
                sampling_config=sampling, end_id=end_id, pad_id=max(end_id, 0)))
            self.live[rid] = (request, index)
        self.stats.prompt_tokens += len(request.prompt)

    def cancel(self, request: Any) -> None:
        for rid, (live, _) in list(self.live.items()):
            if live is request:
                self.executor.cancel_request(rid)

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=self._loop, name="trtllm-executor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join()
        self.executor.shutdown()

    def _loop(self) -> None:
        import datetime

        while not self._stop:
            for response in self.executor.await_responses(datetime.timedelta(milliseconds=50)):
                found = self.live.get(response.request_id)
                if found is None:
                    continue
                request, index = found
                if response.has_error():
                    reason, tokens = "error", []
                else:
                    result = response.result
                    tokens = list(result.output_token_ids[0])
                    reason = None
                    if result.is_final:
                        last = request.outputs[index][-1:] + tokens[-1:]
                        reason = "stop" if last and last[-1] in request.params.stop_ids else "length"
                for token in tokens:
                    request.emit(index, token)
                self.stats.generated_tokens += len(tokens)
                if reason is not None:
                    del self.live[response.request_id]
                    request.finish(index, reason)
                    self.stats.finished_requests += request.finished == request.n
