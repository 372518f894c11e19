"""`python -m export.onnx`: a KV-cached ONNX decoder for CPU serving (fp32, INT8, INT4).

The graph comes from onnxruntime-genai's model builder (fused GroupQueryAttention with rotary
embedding, `MatMulNBits` for 4/8-bit weights). A GPTQ artifact exports at int4 with *its own*
integers, scales and zero points: the builder lays out the graph, then every `MatMulNBits` weight
is replaced by the GPTQ tensors repacked (act-order columns are regrouped by a Gather on the
activation, so no value is re-quantized). Float artifacts use the builder's own int4/int8
quantizer, or ONNX Runtime's dynamic int8 quantization (`--int8-method dynamic`).

Architectures the builder does not know fall back to `torch.onnx.export(dynamo=True)` with a
concatenating KV cache (export/onnx_torch.py; fp32, or int8 by dynamic quantization).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.artifact import Artifact, open_artifact, verify, write_artifact
from core.config import field, parse_config
from core.errors import UserError, run_main
from core.family import head_dim, require, sliding_window
from export.onnx_gptq import float_copy, gptq_lm_head, inject_gptq
from export.onnx_torch import builder_architectures, export_with_torch
from runtime.quantized import load_quantized_model

PRECISIONS = ("fp32", "int8", "int4")
INT8_METHODS = ("weight-only", "dynamic")
LM_HEADS = ("float", "int8", "int4", "int4-gptq")
EXPORTERS = ("auto", "builder", "torch")

@dataclass
class OnnxExportConfig:
    artifact: str = field("artifacts/reference", help="artifact to export (reference, distilled, pruned or GPTQ)")
    out: str = field(None, help="output artifact directory")
    precision: str = field("fp32", help="weight precision of the export", choices=PRECISIONS)
    block_size: int | None = field(None, help="int4/int8 weight-only block size (16-256; default 32, or the "
                                   "GPTQ group size for a GPTQ artifact)")
    symmetric: bool = field(True, help="builder quantizer: symmetric grid (--no-symmetric for zero points)")
    int8_method: str = field("weight-only", help="int8: the builder's weight-only MatMulNBits, or ORT "
                             "quantize_dynamic (per-channel weights, dynamic int8 activations)", choices=INT8_METHODS)
    accuracy_level: int = field(4, help="MatMulNBits compute type: 0/1 fp32, 4 int8 activations (fastest)",
                                choices=(0, 1, 2, 3, 4))
    lm_head: str = field("float", help="LM head weights (int4/int8 exports): float, the builder's int8 / int4 "
                         "quantizer, or int4-gptq (GPTQ-calibrated here; GPTQ sources)", choices=LM_HEADS)
    exporter: str = field("auto", help="auto: onnxruntime-genai's builder where it knows the architecture, "
                          "else torch.onnx.export (dynamo)", choices=EXPORTERS)
    overwrite: bool = field(False, help="replace an existing artifact at --out")

    def validate(self) -> None:
        if not self.out:
            raise UserError("out: required (the output artifact directory)")
        bs = self.block_size
        if bs is not None and (bs < 16 or bs > 256 or bs & (bs - 1)):
            raise UserError(f"block_size: must be a power of two in 16..256, got {bs}")
        weight_only = self.precision == "int4" or (self.precision == "int8" and self.int8_method == "weight-only")
        if self.lm_head != "float" and not weight_only:
            raise UserError(f"lm_head: {self.lm_head} needs a weight-only int4/int8 export")
        if self.lm_head in ("int4", "int4-gptq") and self.precision == "int8":
            raise UserError("lm_head: an int8 export keeps its head at int8 or float")


def gptq_config(artifact: Artifact, config: dict[str, Any]) -> dict[str, Any] | None:
    """The source's GPTQ quantization_config (None for a float model); other quantizations are refused."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if quant.get("quant_method") != "gptq":
        raise UserError(f"{artifact.path}: quant_method {quant.get('quant_method')!r} does not export to ONNX; "
                        "export its unquantized parent and pick --precision int8/int4")
    return quant


def with_layer_types(source: Path, hf: dict[str, Any], work: Path) -> Path:
    """The builder reads sliding windows from `layer_types` only; Mistral's config has none (every layer
    slides), which the builder would export as full attention without a word. A linked copy states it."""
    if hf.get("layer_types") or sliding_window(hf, 0) is None:
        return source
    work.mkdir()
    for file in source.iterdir():
        if file.name != "config.json":
            (work / file.name).symlink_to(file.resolve())
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["layer_types"] = ["sliding_attention"] * config["num_hidden_layers"]
    (work / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return work


def run_builder(source: Path, out: Path, precision: str, options: dict[str, Any], log: Path) -> None:
    """onnxruntime-genai's builder, its chatter sent to `log`; a failure is one line with its reason."""
    try:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as exc:
        raise UserError("onnxruntime-genai is not installed: pip install 'lm-shrinkwrap[export]'") from exc
    args = ("", str(source), str(out), precision, "cpu", str(out.parent / "builder-cache"))
    quiet = logging.getLogger("onnxruntime.quantization")
    level, quiet.level = quiet.level, logging.WARNING
    with open(log, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            opts = parse_extra_options(*args, [f"{k}={v}" for k, v in options.items()])
            create_model(*args, **opts)
        except Exception as exc:
            sink.flush()
            raise UserError(f"the ONNX builder failed on {source}: {type(exc).__name__}: "
                            f"{(str(exc).strip().splitlines() or [''])[0][:200]}") from exc
        finally:
            quiet.setLevel(level)


def quantize_dynamic_int8(onnx_dir: Path, exclude: Sequence[str] = ("/lm_head/MatMul",),
                          op_types: Sequence[str] = ("MatMul",)) -> None:
    """ORT dynamic quantization of the fp32 export's MatMuls (per-channel int8 weights), head excluded."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = onnx_dir / "model.onnx"
    tmp = onnx_dir / "model.int8.onnx"
    quantize_dynamic(src, tmp, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
                     nodes_to_exclude=list(exclude), use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True})
    src.unlink()
    (onnx_dir / "model.onnx.data").unlink()
    import onnx

    model = onnx.load(str(tmp))
    onnx.save(model, str(src), save_as_external_data=True, location="model.onnx.data")
    for leftover in onnx_dir.glob("model.int8.onnx*"):
        leftover.unlink()


def export_onnx(source: Artifact, cfg: OnnxExportConfig) -> Artifact:
    """Build the ONNX decoder for `source` and write it as an `onnx` artifact."""
    problems = verify(source)
    if problems:
        raise UserError(f"refusing to export a damaged artifact: {problems[0]}")
    hf = source.hf_config
    family = require(hf, "export.onnx")
    gptq = gptq_config(source, hf)
    architecture = (hf.get("architectures") or ["(none)"])[0]
    builder_reads_it = family is not None and family.onnx_builder and architecture in builder_architectures()
    if cfg.exporter == "torch" or (cfg.exporter == "auto" and not builder_reads_it):
        return _export_torch(source, cfg, hf, gptq, architecture)
    if head_dim(hf) % 16:
        raise UserError(f"{source.path}: head size {head_dim(hf)} is not a multiple of 16 (ONNX Runtime's "
                        "GroupQueryAttention needs that)")
    if gptq is not None and cfg.precision != "int4":
        raise UserError(f"{source.path} is a GPTQ artifact: export it with --precision int4 (its own weights)")
    if cfg.lm_head == "int4-gptq" and gptq is None:
        raise UserError(f"lm_head: int4-gptq calibrates the head of a GPTQ artifact; {source.path} is not one "
                        "(use --lm-head int4 for the builder's quantizer)")
    block = cfg.block_size or (gptq["group_size"] if gptq else 32)
    if gptq is not None and block != gptq["group_size"]:
        raise UserError(f"block_size: a GPTQ artifact exports with its group size ({gptq['group_size']}), "
                        f"not {block}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shrinkwrap-onnx-") as work_dir:
        work = Path(work_dir)
        build = work / "build"
        options: dict[str, Any] = {}
        builder_precision = cfg.precision
        if cfg.precision == "int8" and cfg.int8_method == "dynamic":
            builder_precision = "fp32"
        if builder_precision in ("int4", "int8"):
            symmetric = cfg.symmetric and gptq is None
            options = {"block_size": block, "is_symmetric": str(symmetric).lower(),
                       "accuracy_level": cfg.accuracy_level}
            if not symmetric or cfg.lm_head == "int8":
                options["shared_embeddings"] = "false"  # only a symmetric int4 head can share the embeddings
            if cfg.lm_head == "float":
                options["nodes_to_exclude"] = "/lm_head/MatMul"
            elif cfg.lm_head == "int8" and cfg.precision == "int4":
                options["matmul_mixed_precision"] = "last_matmul:int8"
        if cfg.lm_head == "int4-gptq":
            options.pop("nodes_to_exclude", None)  # the builder writes an int4 head, then it gets GPTQ's
        gptq_model = load_quantized_model(source.path) if gptq else None
        builder_source = float_copy(source, gptq_model, work / "float") if gptq else source.path
        builder_source = with_layer_types(builder_source, hf, work / "source")
        print(f"building the {cfg.precision} graph with onnxruntime-genai's builder ...", flush=True)
        run_builder(builder_source, build, builder_precision, options, work / "builder.log")
        weights = "float"
        if gptq is not None:
            head = None
            if cfg.lm_head == "int4-gptq":
                from compress.models import load_tokenizer

                print("GPTQ-quantizing the LM head on calibration windows ...", flush=True)
                head, head_info = gptq_lm_head(gptq_model, load_tokenizer(source.path), block)
            replaced = inject_gptq(build, gptq_model, block, head)
            weights = f"GPTQ integers, scales and zero points of the source ({replaced} MatMulNBits, exact)"
            if head is not None:
                weights += f"; LM head GPTQ int4 here (asym, group {block}, weight rel. error " \
                           f"{head_info['weight_rel_err']}, calibration {head_info['source']})"
        elif cfg.precision == "int8" and cfg.int8_method == "dynamic":
            print("quantizing MatMuls with onnxruntime quantize_dynamic (per-channel int8) ...", flush=True)
            quantize_dynamic_int8(build)
            weights = "onnxruntime quantize_dynamic: per-channel int8 weights, dynamic int8 activations (LM head float)"
        elif cfg.precision != "fp32":
            weights = (f"onnxruntime-genai builder quantizer (round-to-nearest, {cfg.precision}, block {block}, "
                       f"{'symmetric' if cfg.symmetric else 'asymmetric'})")
        info = {"precision": cfg.precision, "weights": weights, "block_size": block if cfg.precision != "fp32"
                else None, "accuracy_level": cfg.accuracy_level, "int8_method": cfg.int8_method
                if cfg.precision == "int8" else None, "lm_head": cfg.lm_head, "builder": "onnxruntime-genai model builder"}
        return _write_onnx_artifact(build, source, cfg, hf, info, started)


def _write_onnx_artifact(build: Path, source: Artifact, cfg: OnnxExportConfig, hf: dict[str, Any],
                         info: dict[str, Any], started: float) -> Artifact:
    """Both exporters end here: logits_to_keep, the source's config, the manifest, atomically."""
    add_logits_to_keep(build)
    config = {k: v for k, v in hf.items() if k != "quantization_config"}
    (build / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for file in build.iterdir():
        file.chmod(0o644)  # onnx.save writes its data file 0600
    info["wall_seconds"] = round(time.perf_counter() - started, 1)
    with write_artifact(cfg.out, "onnx", "export.onnx", asdict(cfg), parent=source, overwrite=cfg.overwrite,
                        extra={"onnx": info}) as tmp:
        for file in build.iterdir():
            shutil.move(str(file), tmp / file.name)
    return open_artifact(cfg.out)


def add_logits_to_keep(onnx_dir: Path) -> None:
    """Give the graph a `logits_to_keep` input (default 0: every position) sliced before the LM head.

    The runtime passes 1 in prefill, so a 100-token prompt computes one row of the 49k-wide head
    instead of 100 (about a fifth of the prefill FLOPs on SmolLM2); evaluation and onnxruntime-genai's
    generator, which do not feed it, get every position as before.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)  # rewrites the graph, leaves model.onnx.data alone
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    head = producer["logits"]
    while head.op_type in ("Cast", "Identity"):
        head = producer[head.input[0]]
    constants = {"logits_to_keep": [0], "logits_to_keep/ends": [np.iinfo(np.int64).max], "logits_to_keep/axes": [1]}
    for name, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    graph.input.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    kept = head.input[0] + "/kept"
    nodes = [helper.make_node("Neg", ["logits_to_keep"], ["logits_to_keep/starts"], name="/logits_to_keep/Neg"),
             helper.make_node("Slice", [head.input[0], "logits_to_keep/starts", "logits_to_keep/ends",
                                        "logits_to_keep/axes"], [kept], name="/logits_to_keep/Slice")]
    head.input[0] = kept
    index = next(i for i, node in enumerate(graph.node) if node is head)
    for node in reversed(nodes):
        graph.node.insert(index, node)
    logits = next(out for out in graph.output if out.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "kept_sequence_length"
    onnx.save(model, str(path))


def _export_torch(source: Artifact, cfg: OnnxExportConfig, hf: dict[str, Any], gptq: dict | None,
                  architecture: str) -> Artifact:
    """The fallback path: torch.onnx.export (dynamo) at fp32, then optionally ORT dynamic int8."""
    why = f"{source.path} ({architecture}) exports through torch.onnx.export"
    if gptq is not None or cfg.precision == "int4":
        raise UserError(f"{why}: int4 (MatMulNBits, GPTQ weights) needs onnxruntime-genai's builder, which does "
                        "not support this architecture; export at fp32 or int8")
    if cfg.precision == "int8" and cfg.int8_method != "dynamic":
        raise UserError(f"{why}: int8 there is ONNX Runtime's dynamic quantization: pass --int8-method dynamic")
    if cfg.lm_head != "float" or cfg.block_size is not None:
        raise UserError(f"{why}: --lm-head and --block-size apply to the builder's weight-only quantizer only")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shrinkwrap-onnx-") as work_dir:
        build = Path(work_dir) / "build"
        build.mkdir()
        print(f"{architecture} is not in onnxruntime-genai's builder: exporting with torch.onnx.export "
              "(dynamo) ...", flush=True)
        export_with_torch(source.path, build, Path(work_dir) / "export.log")
        weights = "float"
        if cfg.precision == "int8":
            import onnx

            graph = onnx.load(str(build / "model.onnx"), load_external_data=False).graph
            head = [node.name for node in graph.node if "logits" in node.output]
            print("quantizing MatMul/Gemm with onnxruntime quantize_dynamic (per-channel int8) ...", flush=True)
            quantize_dynamic_int8(build, exclude=head, op_types=("MatMul", "Gemm"))
            weights = "onnxruntime quantize_dynamic: per-channel int8 weights, dynamic int8 activations (LM head float)"
        for file in source.path.iterdir():  # tokenizer and generation files travel with the graph
            if file.is_file() and file.suffix not in (".safetensors", ".bin") and file.name != "shrinkwrap.json":
                shutil.copy(file, build / file.name)
        info = {"precision": cfg.precision, "weights": weights, "block_size": None, "accuracy_level": None,
                "int8_method": "dynamic" if cfg.precision == "int8" else None, "lm_head": "float",
                "builder": "torch.onnx.export (dynamo), concatenating KV cache", "kv_cache": "concat"}
        return _write_onnx_artifact(build, source, cfg, hf, info, started)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(OnnxExportConfig, argv, "python -m export.onnx", __doc__.splitlines()[0])
    artifact = export_onnx(open_artifact(cfg.artifact), cfg)
    info = artifact.manifest["onnx"]
    print(f"onnx artifact: {artifact.path} ({artifact.model_size_bytes() / 1e6:.0f} MB, {info['precision']}, "
          f"{info['wall_seconds']} s)")


if __name__ == "__main__":
    run_main(main)
