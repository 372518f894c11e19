"""ONNX Runtime backend: runs an exported decoder (`onnx` artifact) with a KV cache kept in place.

The exported graph (onnxruntime-genai's builder: GroupQueryAttention with rotary embedding inside)
takes `input_ids`, an `attention_mask` whose width is the total length so far, and per-layer past
keys/values. We give it one preallocated buffer per layer of the full context length and bind the
same buffer as past input and present output (GQA's shared-buffer mode), so each step writes only
its new rows and nothing is copied between steps. Graphs from the torch.onnx fallback
(`kv_cache: concat`) return past + new as fresh tensors: ORT allocates them and they are bound,
as they are, as the next step's pasts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError
from runtime.engine import GenerationStats, SamplingParams, next_token

GENAI_CONFIG = "genai_config.json"


def is_onnx_artifact(path: str | Path) -> bool:
    return (Path(path) / GENAI_CONFIG).is_file()


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError("onnxruntime is not installed: pip install 'lm-shrinkwrap[runtime]'") from exc
    return ort


def session_options(threads: int | None = None):
    """Intra-op threads = cores (or `threads`), full graph optimizations, sequential execution."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no BFC arena: decode steps allocate small, differently shaped temporaries each step, and the
    # arena's bookkeeping cost 9-14% of int4 decode speed here (interleaved A/B; prefill unchanged)
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3  # errors only ("initializer appears in graph inputs" is logits_to_keep, on purpose)
    return opts


class OnnxDecoder:
    """One exported decoder and its ORT session."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = _import_ort()
        self.dir = Path(path)
        config_file = self.dir / GENAI_CONFIG
        if not config_file.is_file():
            raise UserError(f"{config_file}: missing (not an ONNX export)")
        try:
            model = json.loads(config_file.read_text())["model"]
            decoder = model["decoder"]
            self.context_length, self.vocab_size = int(model["context_length"]), int(model["vocab_size"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"{config_file}: unreadable genai config ({exc})") from exc
        self.model_file = model_file = self.dir / decoder["filename"]
        self.layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_dim = int(decoder["head_size"])
        self.kv_layout = decoder.get("kv_cache", "shared")
        if self.kv_layout not in ("shared", "concat"):
            raise UserError(f"{config_file}: decoder.kv_cache must be shared or concat, got {self.kv_layout!r}")
        names = decoder["inputs"]
        self.past_names = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        outs = decoder["outputs"]
        self.present_names = [(outs["present_key_names"] % i, outs["present_value_names"] % i)
                              for i in range(self.layers)]
        try:
            self.session = ort.InferenceSession(str(model_file), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{model_file}: cannot load ONNX model ({first})") from exc
        self.kv_dtype = np.float16 if "float16" in self.session.get_inputs()[2].type else np.float32
        self.keeps_logits = any(i.name == "logits_to_keep" for i in self.session.get_overridable_initializers())
        # (an overridable initializer binds as an OrtValue only: bind_cpu_input does not find it)
        self.keep = {last: ort.OrtValue.ortvalue_from_numpy(np.asarray([int(last)], dtype=np.int64))
                     for last in (False, True)}
        self.ort = ort

    def new_cache(self, batch: int, max_len: int | None = None) -> OnnxCache | OnnxConcatCache:
        """An empty cache for `max_len` positions (shared buffers, or growing tensors for concat graphs)."""
        kind = OnnxCache if self.kv_layout == "shared" else OnnxConcatCache
        return kind(self, batch, min(max_len or self.context_length, self.context_length))

    def forward(self, input_ids: np.ndarray, cache: OnnxCache | OnnxConcatCache, past_len: int,
                last_only: bool = False) -> np.ndarray:
        """Logits (batch, new tokens or 1 with `last_only`, vocab) for `input_ids` after `past_len` cached tokens."""
        return cache.run(input_ids, past_len, last_only)

    def bind_step(self, binding, cache: OnnxCache | OnnxConcatCache, input_ids: np.ndarray, past_len: int,
                  last_only: bool) -> np.ndarray:
        """Check the step against the cache, bind `input_ids`, the mask, `logits_to_keep` (exports that
        have it) and the logits output; returns the logits array ORT fills when the binding runs."""
        batch, new = input_ids.shape
        if batch != cache.batch:
            raise ValueError(f"cache holds {cache.batch} sequences, got {batch}")
        if past_len + new > cache.length:
            raise UserError(f"sequence of {past_len + new} tokens exceeds the cache ({cache.length})")
        return self.bind_inputs(binding, input_ids, cache.mask[:, : past_len + new], last_only)

    def bind_inputs(self, binding, input_ids: np.ndarray, mask: np.ndarray, last_only: bool) -> np.ndarray:
        """Bind `input_ids`, the attention mask (row b: that sequence's positions), `logits_to_keep` and the
        logits output; returns the logits array ORT fills when the binding runs."""
        batch, new = input_ids.shape
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self.keeps_logits:
            binding.bind_ortvalue_input("logits_to_keep", self.keep[last_only])
        rows = 1 if last_only and self.keeps_logits else new  # an older export returns every row
        out = np.empty((batch, rows, self.vocab_size), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        return out[:, -1:] if last_only else out

    def window_logits(self, windows: np.ndarray) -> np.ndarray:
        """Logits for whole windows (batch, length) from an empty cache: what evaluation needs."""
        return self.forward(windows, self.new_cache(windows.shape[0], windows.shape[1]), 0)


class OnnxCache:
    """KV buffers bound as both past input and present output (shared-buffer GQA), plus the binding.

    Only `input_ids`, the attention mask and the logits output are re-bound per step
    (`OnnxDecoder.bind_step`); ORT writes the logits straight into the array returned.
    """

    def __init__(self, decoder: OnnxDecoder, batch: int, length: int):
        ort = decoder.ort
        self.decoder, self.batch, self.length = decoder, batch, length
        shape = (batch, decoder.kv_heads, length, decoder.head_dim)
        self.values = [(ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder.kv_dtype),
                        ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder.kv_dtype))
                       for _ in range(decoder.layers)]
        self.binding = decoder.session.io_binding()
        for (past_k, past_v), (pres_k, pres_v), (k, v) in zip(decoder.past_names, decoder.present_names,
                                                              self.values, strict=True):
            self.binding.bind_ortvalue_input(past_k, k)
            self.binding.bind_ortvalue_input(past_v, v)
            self.binding.bind_ortvalue_output(pres_k, k)
            self.binding.bind_ortvalue_output(pres_v, v)
        self.mask = np.ones((batch, length), dtype=np.int64)

    def run(self, input_ids: np.ndarray, past_len: int, last_only: bool = False) -> np.ndarray:
        out = self.decoder.bind_step(self.binding, self, input_ids, past_len, last_only)
        self.decoder.session.run_with_iobinding(self.binding)
        return out


class OnnxConcatCache:
    """Per-layer past tensors that the graph returns grown by the new tokens (torch.onnx fallback)."""

    def __init__(self, decoder: OnnxDecoder, batch: int, length: int):
        self.decoder, self.batch, self.length = decoder, batch, length
        empty = np.zeros((batch, decoder.kv_heads, 0, decoder.head_dim), dtype=decoder.kv_dtype)
        self.past = [decoder.ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * decoder.layers)]
        self.filled = 0
        self.mask = np.ones((batch, length), dtype=np.int64)

    def run(self, input_ids: np.ndarray, past_len: int, last_only: bool = False) -> np.ndarray:
        if past_len != self.filled:
            raise ValueError(f"this cache holds {self.filled} positions, asked to continue after {past_len}")
        decoder = self.decoder
        binding = decoder.session.io_binding()
        out = decoder.bind_step(binding, self, input_ids, past_len, last_only)  # logits: the first output
        names = [name for pair in decoder.past_names for name in pair]
        for name, value in zip(names, self.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in (name for pair in decoder.present_names for name in pair):
            binding.bind_output(name, "cpu")
        decoder.session.run_with_iobinding(binding)
        self.past = binding.get_outputs()[1:]
        self.filled += input_ids.shape[1]
        return out


class OnnxEngine:
    """Generation over an OnnxDecoder; same results and stats as the PyTorch Engine's `generate`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.decoder = OnnxDecoder(path, threads)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], GenerationStats]:
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
        outputs = []
        for prompt in prompts:
            if not prompt:
                raise UserError("empty prompt")
            cache = self.decoder.new_cache(1, len(prompt) + params.max_new_tokens)
            start = time.perf_counter()
            logits = self.decoder.forward(np.asarray([prompt]), cache, 0, last_only=True)[0, -1]
            stats.prefill_s += time.perf_counter() - start
            start = time.perf_counter()
            out: list[int] = []
            while True:
                token = next_token(torch.from_numpy(logits), params, gen)
                out.append(token)
                if token in params.stop_ids or len(out) >= params.max_new_tokens:
                    break
                logits = self.decoder.forward(np.asarray([[token]]), cache, len(prompt) + len(out) - 1)[0, -1]
                stats.target_steps += 1
            stats.decode_s += time.perf_counter() - start
            outputs.append(out)
        stats.new_tokens = sum(map(len, outputs))
        return outputs, stats


class OnnxCausalLM(torch.nn.Module):
    """The exported decoder behind the call the evaluators use: `model(ids).logits` (CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        from transformers import AutoConfig

        self.decoder = OnnxDecoder(path, threads)
        self.config = AutoConfig.from_pretrained(path)

    def forward(self, input_ids, **_: object):
        from transformers.modeling_outputs import CausalLMOutput

        logits = self.decoder.window_logits(input_ids.cpu().numpy())
        return CausalLMOutput(logits=torch.from_numpy(logits))

    def logical_parameters(self) -> int:
        """Weights the graph stands for: a packed MatMulNBits counts K x N, scales and caches nothing."""
        import onnx

        graph = onnx.load(str(self.decoder.model_file), load_external_data=False).graph
        packed = {name for node in graph.node if node.op_type == "MatMulNBits" for name in node.input[1:]}
        total = sum(_attr(node, "K") * _attr(node, "N") for node in graph.node if node.op_type == "MatMulNBits")
        for init in graph.initializer:
            skip = init.name in packed or init.name in ("cos_cache", "sin_cache") or init.name.startswith(
                "logits_to_keep") or any(
                init.name.endswith(s) for s in ("_scale", "_scales", "_zero_point", "_zero_points", "_perm"))
            if not skip:
                total += int(np.prod(init.dims))
        if getattr(self.config, "tie_word_embeddings", False):  # the builder unties embedding and head:
            total -= self.config.vocab_size * self.config.hidden_size  # count the tied matrix once
        return total


def _attr(node, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)
