"""Finish a Shrinkwrap TensorRT-LLM GPTQ checkpoint on the target machine with TensorRT-LLM's own ops.

Standalone on purpose (torch, safetensors and tensorrt_llm only; no Shrinkwrap): the exporter copies it
into the artifact as `convert.py`. It reads `config.json` and `rank{r}.prelayout.safetensors` beside it,
turns every groupwise-quantized weight (int8 holding q - midpoint, [K, N]) into the layout TensorRT-LLM's
mixed-precision GEMM reads on this GPU (int4 pairs packed, then `preprocess_weights_for_mixed_gemm`, as
TensorRT-LLM's own GPTQ loader does), and writes `config.json` + `rank{r}.safetensors` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def convert(source: Path, out: Path) -> None:
    import tensorrt_llm  # noqa: F401 - registers torch.ops.trtllm
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((source / "config.json").read_text())
    four_bit = config["quantization"]["quant_algo"] == "W4A16_GPTQ"
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(config["mapping"]["world_size"]):
        tensors = load_file(source / f"rank{rank}.prelayout.safetensors")
        for name, t in list(tensors.items()):
            if name.endswith(".weight") and t.dtype == torch.int8:
                if four_bit:
                    t = torch.ops.trtllm.pack_int8_tensor_to_packed_int4(t.contiguous())
                layout = torch.ops.trtllm.preprocess_weights_for_mixed_gemm(
                    t.contiguous(), torch.quint4x2 if four_bit else torch.int8, torch.float16)
                tensors[name] = layout.view(torch.float16)
        save_file(tensors, out / f"rank{rank}.safetensors")
    shutil.copy(source / "config.json", out / "config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="checkpoint", help="folder for the finished checkpoint")
    args = parser.parse_args()
    convert(Path(__file__).resolve().parent, Path(args.out))
    print(f"wrote {args.out}/config.json and rank*.safetensors: now trtllm-build --checkpoint_dir {args.out}")


if __name__ == "__main__":
    main()
