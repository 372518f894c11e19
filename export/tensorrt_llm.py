"""`python -m export.tensorrt_llm`: a TensorRT-LLM 1.2.x unified checkpoint (what `trtllm-build` consumes).

The layout follows TensorRT-LLM's Llama converter (`tensorrt_llm/models/llama/convert.py`, v1.2.1):
`config.json` (architecture, dtype, sizes, `rope_gpt_neox` with `rotary_base`, `mapping`,
`quantization`) and one `rank{r}.safetensors` per tensor-parallel rank:
`transformer.vocab_embedding.weight` (whole on every rank), per layer `attention.qkv.weight`
(q, k, v concatenated on the output dimension, each split by heads; KV heads repeated when there
are fewer than ranks), `attention.dense.weight` (split on the input dimension), `mlp.fc.weight` =
HF gate_proj (the activated branch), `mlp.gate.weight` = HF up_proj (both split on the output
dimension), `mlp.proj.weight` = down_proj (input dimension), `input_layernorm.weight`,
`post_layernorm.weight`; `transformer.ln_f.weight`; `lm_head.weight` (always written, also when
tied; the vocabulary padded to a multiple of the ranks and split).

GPTQ sources become W4A16_GPTQ (4-bit) or W8A16_GPTQ (8-bit): TensorRT-LLM takes the integers as
stored minus the midpoint (q - 8), `weights_scaling_factor` = scales and `zero` = (midpoint - z) *
scales per group, so w = q_signed * scale + zero = (q - z) * scale, exactly GPTQ's weight. The last
step, `preprocess_weights_for_mixed_gemm`, lays the integers out for one GPU generation and is a
TensorRT-LLM op: the artifact carries the integers arranged and named for it
(`rank{r}.prelayout.safetensors`) and `convert.py`, which runs that op on the target machine and
writes the final `rank{r}.safetensors` (this exporter runs it itself when `tensorrt_llm` imports).
Act-order checkpoints and group sizes that do not divide every input size are refused: TensorRT-LLM
has no g_idx and pads ragged groups.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from compress.artifact import Artifact, open_artifact, verify, write_artifact
from core.config import field, parse_config
from core.errors import UserError, run_main
from core.family import head_dim, require

TRTLLM_VERSION = "1.2.1"  # the last stable release with the TensorRT engine path (trtllm-build)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}  # split on the output dimension


@dataclass
class TrtllmExportConfig:
    artifact: str = field(None, help="artifact to export (float or GPTQ Llama-family)")
    out: str = field(None, help="output artifact directory")
    dtype: str = field("float16", help="activation/weight dtype of the engine", choices=tuple(DTYPES))
    tp_size: int = field(1, help="tensor-parallel ranks (one rank file each)")
    max_batch_size: int = field(64, help="trtllm-build --max_batch_size")
    max_input_len: int = field(1024, help="trtllm-build --max_input_len")
    max_seq_len: int = field(2048, help="trtllm-build --max_seq_len")
    max_draft_len: int = field(0, help="> 0: build for draft-target speculative decoding with this many draft tokens")
    overwrite: bool = field(False, help="replace an existing --out")

    def validate(self) -> None:
        if not self.artifact or not self.out:
            raise UserError("artifact and out are required")
        for name in ("tp_size", "max_batch_size", "max_input_len", "max_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive")
        if self.max_input_len >= self.max_seq_len or self.max_draft_len < 0:
            raise UserError("max_input_len must be below max_seq_len, max_draft_len >= 0")


def _read_config(artifact: Artifact) -> dict[str, Any]:
    path = artifact.path / "config.json"
    if not path.is_file():
        raise UserError(f"{artifact.path}: no config.json ({artifact.kind} artifacts do not export to TensorRT-LLM)")
    hf = artifact.hf_config
    require(hf, "export.tensorrt_llm")
    return hf


def check_gptq(hf: dict[str, Any], tp: int, source: str) -> dict[str, Any] | None:
    """The GPTQ settings if this is a GPTQ checkpoint TensorRT-LLM can take, else a one-line refusal."""
    quant = hf.get("quantization_config")
    if quant is None:
        return None
    fix = (f"make a compatible one: python -m compress.quantize --artifact <its float parent> --method gptq "
           f"--bits {quant.get('bits', 4)} --no-desc-act --group-size 64 --out <dir>")
    if quant.get("quant_method") != "gptq":
        raise UserError(f"{source}: quant_method {quant.get('quant_method')!r} has no TensorRT-LLM form; export "
                        "its float parent instead")
    if quant.get("group_size", 128) == -1:
        raise UserError(f"{source}: per-channel GPTQ (group size -1): TensorRT-LLM's GPTQ takes groups; {fix}")
    if quant.get("bits") not in (4, 8):
        raise UserError(f"{source}: {quant.get('bits')}-bit GPTQ: TensorRT-LLM takes 4 or 8 bits")
    if quant.get("desc_act"):
        raise UserError(f"{source}: act-order (desc_act) GPTQ: TensorRT-LLM has no g_idx ('GPTQ with desc_act=True "
                        f"is not implemented'); {fix}")
    group = quant.get("group_size", 128)
    heads_dim = hf["num_attention_heads"] * head_dim(hf)
    inputs = {"hidden_size": hf["hidden_size"], "intermediate_size": hf["intermediate_size"], "o_proj": heads_dim}
    if group != -1:
        for name, k in inputs.items():
            if k % group or (name != "hidden_size" and (k // tp) % group):
                raise UserError(f"{source}: group size {group} does not divide {name} {k}"
                                + (f" / tp {tp}" if tp > 1 else "") + f" (TensorRT-LLM would pad the group); {fix}")
    return quant


def check_tp(hf: dict[str, Any], tp: int) -> None:
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads", hf["num_attention_heads"])
    problems = []
    if heads % tp:
        problems.append(f"{heads} attention heads")
    if kv % tp and tp % kv:
        problems.append(f"{kv} KV heads")
    if hf["intermediate_size"] % tp:
        problems.append(f"intermediate size {hf['intermediate_size']}")
    if problems:
        raise UserError(f"tp_size: {tp} does not divide the model's {', '.join(problems)}")


def trtllm_config(hf: dict[str, Any], cfg: TrtllmExportConfig, quant: dict[str, Any] | None) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if rope and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    quantization: dict[str, Any] = {"quant_algo": None, "kv_cache_quant_algo": None}
    if quant is not None:
        quantization.update(quant_algo="W4A16_GPTQ" if quant["bits"] == 4 else "W8A16_GPTQ",
                            group_size=quant.get("group_size", 128), has_zero_point=True, pre_quant_scale=False,
                            exclude_modules=None)  # None: TensorRT-LLM's default keeps lm_head in float
    return {
        "architecture": "LlamaForCausalLM", "dtype": cfg.dtype, "logits_dtype": "float32",
        "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "hidden_size": hf["hidden_size"], "intermediate_size": hf["intermediate_size"], "head_size": head_dim(hf),
        "vocab_size": hf["vocab_size"], "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": hf.get("max_position_embeddings", cfg.max_seq_len),
        "hidden_act": hf.get("hidden_act", "silu"), "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "rotary_base": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), "rotary_scaling": scaling,
        "attn_bias": bool(hf.get("attention_bias", False)), "mlp_bias": bool(hf.get("mlp_bias", False)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "mapping": {"world_size": cfg.tp_size, "tp_size": cfg.tp_size, "pp_size": 1},
        "quantization": quantization,
    }


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise UserError(f"{path}: no *.safetensors weights")
    return state


def _split(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].contiguous() if tp > 1 else t


def repeat_kv(t: torch.Tensor, kv_heads: int, tp: int, dim: int) -> torch.Tensor:
    """KV heads repeated so each rank has one when there are fewer heads than ranks (as TensorRT-LLM does)."""
    if kv_heads >= tp:
        return t
    reps = tp // kv_heads
    shape = list(t.shape)
    t = t.unflatten(dim, (kv_heads, shape[dim] // kv_heads)).unsqueeze(dim + 1)
    t = t.expand(*t.shape[:dim + 1], reps, *t.shape[dim + 2:])
    return t.flatten(dim, dim + 2)


def gptq_linear(state: dict[str, torch.Tensor], name: str, bits: int) -> dict[str, torch.Tensor]:
    """One GPTQ Linear as TensorRT-LLM's converter sees it: signed integers [K, N], scales and zero*scale [G, N]."""
    per = 32 // bits
    mask = (1 << bits) - 1
    mid = 1 << (bits - 1)
    qweight = state[f"{name}.qweight"].to(torch.int64) & 0xFFFFFFFF  # [K / per, N], packed along K
    q = torch.stack([(qweight >> (bits * i)) & mask for i in range(per)], dim=1).flatten(0, 1)  # [K, N]
    qzeros = state[f"{name}.qzeros"].to(torch.int64) & 0xFFFFFFFF  # [G, N / per], packed along N, stored z - 1
    stored = torch.stack([(qzeros >> (bits * i)) & mask for i in range(per)], dim=2).flatten(1, 2)
    scales = state[f"{name}.scales"].to(torch.float32)  # [G, N]
    zero = (mid - (stored[:, : scales.shape[1]] + 1)).to(torch.float32) * scales
    return {"weight": (q - mid).to(torch.int8), "weights_scaling_factor": scales, "zero": zero}


def rank_tensors(hf: dict[str, Any], state: dict[str, torch.Tensor], cfg: TrtllmExportConfig, rank: int,
                 quant: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """Every tensor rank `rank` loads, named and split as TensorRT-LLM's Llama model expects."""
    tp, dtype = cfg.tp_size, DTYPES[cfg.dtype]
    kv_heads = hf.get("num_key_value_heads", hf["num_attention_heads"])
    out: dict[str, torch.Tensor] = {}
    embed = state["model.embed_tokens.weight"]
    out["transformer.vocab_embedding.weight"] = embed.to(dtype)
    head = state.get("lm_head.weight", embed)
    padded = math.ceil(head.shape[0] / tp) * tp
    if padded != head.shape[0]:
        head = torch.cat([head, head.new_zeros(padded - head.shape[0], head.shape[1])])
    out["lm_head.weight"] = _split(head, tp, rank, 0).to(dtype)
    out["transformer.ln_f.weight"] = state["model.norm.weight"].to(dtype)
    names = {"attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj", "mlp.gate": "mlp.up_proj",
             "mlp.proj": "mlp.down_proj"}
    for i in range(hf["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"].to(dtype)
        out[dst + "post_layernorm.weight"] = state[src + "post_attention_layernorm.weight"].to(dtype)
        if quant is None:
            parts = []
            for proj in ("q_proj", "k_proj", "v_proj"):
                w = state[f"{src}self_attn.{proj}.weight"]
                w = w if proj == "q_proj" else repeat_kv(w, kv_heads, tp, 0)
                parts.append(_split(w, tp, rank, 0))
            out[dst + "attention.qkv.weight"] = torch.cat(parts).to(dtype)
            if f"{src}self_attn.q_proj.bias" in state:
                biases = [state[f"{src}self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
                biases = [biases[0]] + [repeat_kv(b, kv_heads, tp, 0) for b in biases[1:]]
                out[dst + "attention.qkv.bias"] = torch.cat([_split(b, tp, rank, 0) for b in biases]).to(dtype)
            for trt, hf_name in names.items():
                w = state[f"{src}{hf_name}.weight"]
                out[f"{dst}{trt}.weight"] = _split(w, tp, rank, 0 if hf_name.split(".")[-1] in COLUMN else 1).to(dtype)
            continue
        if kv_heads < tp:
            raise UserError(f"tp_size: {tp} ranks for {kv_heads} KV heads: TensorRT-LLM's GPTQ path does not repeat "
                            "quantized KV heads")
        bits = quant["bits"]
        qkv = [gptq_linear(state, f"{src}self_attn.{p}", bits) for p in ("q_proj", "k_proj", "v_proj")]
        for key in ("weight", "weights_scaling_factor", "zero"):  # split on N (dim 1), then q|k|v per rank
            t = torch.cat([_split(part[key], tp, rank, 1) for part in qkv], dim=1)
            out[f"{dst}attention.qkv.{key}"] = t if key == "weight" else t.to(torch.float16)
        for trt, hf_name in names.items():
            parts = gptq_linear(state, f"{src}{hf_name}", bits)
            dim = 1 if hf_name.split(".")[-1] in COLUMN else 0  # row-parallel: K, and its groups, split
            for key, t in parts.items():
                t = _split(t, tp, rank, dim)
                out[f"{dst}{trt}.{key}"] = t if key == "weight" else t.to(torch.float16)
    return out


def export_trtllm(source: Artifact, cfg: TrtllmExportConfig) -> Artifact:
    problems = verify(source)
    if problems:
        raise UserError(f"refusing to export a damaged artifact: {problems[0]}")
    hf = _read_config(source)
    check_tp(hf, cfg.tp_size)
    quant = check_gptq(hf, cfg.tp_size, str(source.path))
    if quant is not None and cfg.dtype != "float16":
        raise UserError(f"dtype: {cfg.dtype}: TensorRT-LLM's GPTQ path takes float16 scales and activations "
                        "(--dtype float16)")
    state = _load_state(source.path)
    config = trtllm_config(hf, cfg, quant)
    with tempfile.TemporaryDirectory() as scratch:
        build = Path(scratch)
        from safetensors.torch import save_file

        suffix = ".prelayout.safetensors" if quant else ".safetensors"
        for rank in range(cfg.tp_size):
            tensors = {k: v.contiguous().clone() for k, v in rank_tensors(hf, state, cfg, rank, quant).items()}
            save_file(tensors, build / f"rank{rank}{suffix}")  # (clone: a tied head must be its own tensor)
        (build / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file in source.path.iterdir():  # the tokenizer travels with the checkpoint
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy(file, build / file.name)
        (build / "hf_config.json").write_text(json.dumps(hf, indent=2) + "\n")
        write_scripts(build, cfg, quant is not None)
        converted = quant is not None and run_conversion_here(build)
        info = {"tensorrt_llm_version": TRTLLM_VERSION, "quant_algo": config["quantization"]["quant_algo"],
                "tp_size": cfg.tp_size, "dtype": cfg.dtype, "layout_done": quant is None or converted,
                "engine_built": False}
        with write_artifact(cfg.out, "tensorrt-llm", "export.tensorrt_llm", asdict(cfg), parent=source,
                            overwrite=cfg.overwrite, extra={"tensorrt_llm": info}) as tmp:
            for file in build.iterdir():
                shutil.move(str(file), tmp / file.name)
    return open_artifact(cfg.out)


def run_conversion_here(build: Path) -> bool:
    """Run the layout step here when TensorRT-LLM is importable (a GPU machine with it installed): the
    finished checkpoint then sits in `checkpoint/` inside the artifact."""
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError:
        return False
    from export.trtllm_convert import convert  # pragma: no cover - needs TensorRT-LLM

    convert(build, build / "checkpoint")  # pragma: no cover
    return True  # pragma: no cover


def write_scripts(build: Path, cfg: TrtllmExportConfig, gptq: bool) -> None:
    """build.sh (the exact trtllm-build command) and, for GPTQ, convert.py (the per-GPU layout step)."""
    plugin = "float16" if cfg.dtype == "float32" else cfg.dtype
    spec = (f" \\\n    --speculative_decoding_mode draft_tokens_external --max_draft_len {cfg.max_draft_len}"
            if cfg.max_draft_len else "")
    checkpoint = "checkpoint" if gptq else "."
    lines = ["#!/usr/bin/env bash",
             f"# Build a TensorRT engine from this checkpoint: needs a GPU and tensorrt-llm=={TRTLLM_VERSION}",
             "# (1.2.x is the last release with trtllm-build; later ones removed the TensorRT engine path).",
             "# Not executed by Shrinkwrap's tests: no machine here has TensorRT-LLM.",
             "set -euo pipefail", 'cd "$(dirname "$0")"', 'OUT="${1:-engine}"']
    if gptq:
        lines += ["python convert.py --out checkpoint   # TensorRT-LLM's per-GPU weight layout (needs its ops)"]
    lines += [f"trtllm-build --checkpoint_dir {checkpoint} --output_dir \"$OUT\" \\",
              f"    --gemm_plugin {plugin} --gpt_attention_plugin {plugin} \\",
              "    --paged_kv_cache enable --remove_input_padding enable --context_fmha enable \\",
              f"    --max_batch_size {cfg.max_batch_size} --max_input_len {cfg.max_input_len} "
              f"--max_seq_len {cfg.max_seq_len}{spec}",
              'cp tokenizer* special_tokens_map.json chat_template.jinja "$OUT"/ 2>/dev/null || true',
              'echo "engine in $OUT: python -m runtime.generate --artifact $OUT --prompt ..."']
    (build / "build.sh").write_text("\n".join(lines) + "\n")
    (build / "build.sh").chmod(0o755)
    if gptq:
        shutil.copy(Path(__file__).with_name("trtllm_convert.py"), build / "convert.py")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(TrtllmExportConfig, argv, "python -m export.tensorrt_llm", __doc__.splitlines()[0])
    artifact = export_trtllm(open_artifact(cfg.artifact), cfg)
    info = artifact.manifest["tensorrt_llm"]
    print(f"tensorrt-llm artifact: {artifact.path} ({artifact.model_size_bytes() / 1e6:.0f} MB, "
          f"{info['quant_algo'] or cfg.dtype}, tp {cfg.tp_size}); build the engine on a GPU machine with "
          f"tensorrt-llm=={TRTLLM_VERSION}: bash {artifact.path}/build.sh"
          + ("" if info["layout_done"] else " (it runs convert.py first)"))


if __name__ == "__main__":
    run_main(main)
