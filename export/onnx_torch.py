"""The fallback ONNX exporter: `torch.onnx.export(dynamo=True)` of any HF causal LM, with a KV cache.

For architectures onnxruntime-genai's builder does not know. The graph takes `input_ids`, an
`attention_mask` as wide as past + new tokens, and per-layer `past_key_values.{i}.key/value`
(batch, kv heads, past, head size), and returns `logits` and `present.{i}.key/value` (past + new):
the cache grows by concatenation, so the runtime feeds each step's presents back as the next pasts
(runtime/onnx_backend.py, `kv_cache: concat` in genai_config.json). Rotary/learned positions come
from the mask (cumsum - 1), as in HF `generate`, so left-padded batches work.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch

from core.errors import UserError
from core.family import head_dim, kv_heads

KV_NAMES = {"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}


def builder_architectures() -> set[str]:
    """The architectures onnxruntime-genai's builder dispatches on (read from its source, not imported)."""
    spec = find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return set()
    return set(re.findall(r'architectures\[0\] == "(\w+)"', Path(spec.origin).read_text(encoding="utf-8")))


class _CachedDecoder(torch.nn.Module):
    """Flat tensors in and out (what ONNX needs) around the HF model and its DynamicCache."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def export_with_torch(source: Path, out: Path, log: Path) -> dict:
    """Write `out/model.onnx(+.data)` and `out/genai_config.json` for the HF model at `source` (fp32)."""
    from runtime.loading import load_model

    if find_spec("onnxscript") is None:
        raise UserError("the torch.onnx exporter needs onnxscript: pip install 'lm-shrinkwrap[export]'")
    model = load_model(source, "cpu", dtype=torch.float32).eval()
    text = model.config.get_text_config()
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv, dim = kv_heads(text), head_dim(text)
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    example_past = [torch.zeros(2, kv, 3, dim) for _ in range(2 * layers)]  # sizes 0/1 would specialise
    inputs = (torch.randint(0, text.vocab_size, (2, 4)), torch.ones(2, 7, dtype=torch.long), *example_past)
    pasts, presents = KV_NAMES["inputs"], KV_NAMES["outputs"]
    input_names = ["input_ids", "attention_mask"] + [
        name % i for i in range(layers) for name in (pasts["past_key_names"], pasts["past_value_names"])]
    output_names = ["logits"] + [
        name % i for i in range(layers) for name in (presents["present_key_names"], presents["present_value_names"])]
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past} for _ in example_past))
    chatter = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and friends
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # axis-renaming notes
            program = torch.onnx.export(_CachedDecoder(model, layers), inputs, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=shapes, opset_version=18)
            program.save(str(out / "model.onnx"), external_data=True)
    except Exception as exc:
        log.write_text(chatter.getvalue(), encoding="utf-8")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"torch.onnx.export failed on {source}: {first[:300]} (log: {log})") from exc
    finally:
        onnx_logger.setLevel(level)
    genai = {"model": {"type": text.model_type, "context_length": int(getattr(text, "max_position_embeddings", 0)
                                                                       or getattr(text, "n_positions", 2048)),
                       "vocab_size": int(text.vocab_size),
                       "decoder": {"filename": "model.onnx", "num_hidden_layers": layers, "num_attention_heads": heads,
                                   "num_key_value_heads": kv, "head_size": dim, "kv_cache": "concat",
                                   **KV_NAMES}}}
    (out / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")
    return {"layers": layers, "kv_heads": kv, "head_size": dim}
