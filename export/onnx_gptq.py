"""GPTQ weights into the builder's int4 graph, exactly, and a GPTQ-calibrated int4 LM head.

The builder lays out the graph from a dense fp32 copy of the GPTQ model (`float_copy`); then every
`MatMulNBits` gets the GPTQ artifact's own integers, scales and zero points (`inject_gptq`). The LM
head, float in a GPTQ checkpoint, can be GPTQ-quantized here too (`--lm-head int4-gptq`, then it
goes in with the rest): its Hessian comes from the quantized body's final hidden states on
calibration windows.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.artifact import Artifact
from core.errors import UserError
from core.family import Family, decoder_layers, family_of
from runtime.quantized import GPTQLinear, unpack_cols, unpack_rows


def builder_inputs(family: Family) -> dict[str, tuple[str, ...]]:
    """The builder's MatMulNBits (by node-name key) -> the HF Linears whose outputs it concatenates."""
    if family.fused_gate_up or family.fused_qkv:
        raise UserError(f"{family.name}: fused projections do not go through the builder's int4 graph")
    return {"attn/qkv_proj": family.q_k_v, "attn/o_proj": (family.out_proj,), "mlp/gate_proj": family.gate_up[:1],
            "mlp/up_proj": family.gate_up[1:], "mlp/down_proj": (family.down_proj,)}


def float_copy(artifact: Artifact, gptq_model: torch.nn.Module, into: Path) -> Path:
    """An fp32 HF folder of a GPTQ artifact (the builder lays out its graph from it)."""
    model = copy.deepcopy(gptq_model)
    for name, module in list(model.named_modules()):
        if isinstance(module, GPTQLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantized()
            if module.bias is not None:
                dense.bias.data = module.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(into)
    for file in artifact.path.glob("tokenizer*"):
        shutil.copy(file, into / file.name)
    for name in ("chat_template.jinja", "generation_config.json", "special_tokens_map.json"):
        if (artifact.path / name).is_file():
            shutil.copy(artifact.path / name, into / name)
    return into


def pack_uint4(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into bytes, low nibble first (odd lengths padded with 0)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def gptq_to_matmulnbits(modules: list[GPTQLinear], block: int) -> dict[str, np.ndarray]:
    """GPTQ tensors of one or more Linears sharing an input -> MatMulNBits B/scales/zero_points (+ perm).

    Output channels of fused modules are concatenated (q, k, v). Act-order checkpoints have their
    input columns regrouped (`perm`, to apply to the activation) so that each group is contiguous.
    """
    ints, scales, zeros, perms = [], [], [], []
    for m in modules:
        if m.bits != 4:
            raise UserError(f"int4 export of a {m.bits}-bit GPTQ checkpoint is not supported")
        q = unpack_rows(m.qweight, 4).t().numpy().astype(np.uint8)  # (out, in)
        z = ((unpack_cols(m.qzeros, 4) + 1) & 31).numpy()  # (groups, out), see dequantize_gptq
        g_idx = m.g_idx.long().numpy()
        perm = np.argsort(g_idx, kind="stable")
        if not np.array_equal(g_idx[perm], np.arange(len(g_idx)) // block):
            raise UserError(f"GPTQ groups are not {block} columns each (g_idx); cannot map to MatMulNBits")
        if z.max() > 15:
            raise UserError("a GPTQ zero point does not fit in 4 bits")
        ints.append(q[:, perm])
        scales.append(m.scales.float().numpy().T)
        zeros.append(z.T.astype(np.uint8))
        perms.append(perm)
    if any(not np.array_equal(p, perms[0]) for p in perms[1:]):
        raise UserError("fused q/k/v projections have different act-order permutations")
    q = np.concatenate(ints)  # (N, K)
    n, k = q.shape
    blocks = -(-k // block)
    q = np.pad(q, ((0, 0), (0, blocks * block - k)))
    perm = perms[0]
    return {"B": pack_uint4(q.reshape(n, blocks, block)), "scales": np.concatenate(scales).astype(np.float32),
            "zero_points": pack_uint4(np.concatenate(zeros)),
            "perm": None if np.array_equal(perm, np.arange(k)) else perm.astype(np.int64)}


def _replace_weights(node, inits: dict, packed: dict[str, np.ndarray]) -> None:
    """A MatMulNBits node's B / scales / zero_points initializers <- the repacked GPTQ tensors."""
    from onnx import numpy_helper

    for slot, name in zip(node.input[1:4], ("B", "scales", "zero_points"), strict=True):
        old = inits[slot]
        if tuple(old.dims) != packed[name].shape:
            raise UserError(f"{node.name}: {name} shape {tuple(old.dims)} != GPTQ {packed[name].shape}")
        old.CopyFrom(numpy_helper.from_array(packed[name], slot))


def inject_gptq(onnx_dir: Path, gptq_model: torch.nn.Module, block: int, head: GPTQLinear | None = None) -> int:
    """Replace every decoder MatMulNBits weight by the GPTQ artifact's own (and the int4 LM head's by
    `head`, when given), in one rewrite of the graph; returns the count of decoder MatMulNBits."""
    import onnx
    from onnx import helper, numpy_helper

    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    layers = decoder_layers(gptq_model)
    fused_inputs = builder_inputs(family_of(gptq_model.config))
    new_nodes, replaced, head_done = [], 0, False
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name.startswith("/model/layers."):
            index = int(node.name.split("/")[2].split(".")[1])
            key = "/".join(node.name.split("/")[3:5])
            modules = [layers[index].get_submodule(name) for name in fused_inputs[key]]
            packed = gptq_to_matmulnbits(modules, block)
            _replace_weights(node, inits, packed)
            if packed["perm"] is not None:
                perm_name = f"{node.name}/act_order_perm"
                model.graph.initializer.append(numpy_helper.from_array(packed["perm"], perm_name))
                gathered = f"{node.name}/act_order_input"
                new_nodes.append(helper.make_node("Gather", [node.input[0], perm_name], [gathered], axis=-1,
                                                  name=f"{node.name}/ActOrderGather"))
                node.input[0] = gathered
            replaced += 1
        elif head is not None and node.op_type == "MatMulNBits" and node.name.startswith("/lm_head/"):
            _replace_weights(node, inits, gptq_to_matmulnbits([head], block))
            head_done = True
        new_nodes.append(node)
    if head is not None and not head_done:
        raise UserError(f"{path}: no int4 LM head (MatMulNBits) to put the GPTQ head into")
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    path.unlink()
    (onnx_dir / "model.onnx.data").unlink()
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    return replaced


@torch.no_grad()
def gptq_lm_head(gptq_model: torch.nn.Module, tokenizer: Any, block: int, n_samples: int = 64, seq_len: int = 512
                 ) -> tuple[GPTQLinear, dict[str, Any]]:
    """GPTQ (4-bit, asymmetric, groups of `block`) of the LM head against its real inputs.

    The Hessian is that of the final-norm hidden states of the *quantized* body on calibration
    windows from the corpus train split, so the head compensates the errors the body already makes.
    """
    from compress.calibration import CalibrationFlags, calibration_windows
    from compress.gptq import QuantSpec, quantize_gptq
    from runtime.quantized import pack_gptq

    windows, info = calibration_windows(CalibrationFlags(n_samples=n_samples, seq_len=seq_len), tokenizer)
    head = gptq_model.get_output_embeddings()
    hessian = torch.zeros(head.in_features, head.in_features)
    for batch in windows.split(8):
        hidden = gptq_model.model(batch).last_hidden_state.reshape(-1, head.in_features).float()
        hessian += hidden.t() @ hidden
    hessian *= 2 / windows.numel()
    result = quantize_gptq(head.weight, hessian, QuantSpec(bits=4, group_size=block, sym=False, desc_act=False))
    module = GPTQLinear(head.in_features, head.out_features, 4, block)
    for name, tensor in pack_gptq(result.q, result.scales, result.zeros, result.g_idx, 4).items():
        getattr(module, name).copy_(tensor)
    error = float((module.dequantized() - head.weight.float()).norm() / head.weight.float().norm())
    return module, {**info, "weight_rel_err": round(error, 5), "gptq_loss": result.loss}

