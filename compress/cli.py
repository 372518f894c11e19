"""`shrinkwrap COMMAND ...`: one entry point whose subcommands are the modules (`shrinkwrap quantize ...` is
`python -m compress.quantize ...`). Each subcommand is imported only when used, so a runtime-only install
(`pip install 'lm-shrinkwrap[runtime]'`) runs `shrinkwrap serve` without the training stack."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from core.errors import run_main

COMMANDS = {
    "reference": ("compress.reference", "build the reference artifact (SmolLM2 by default)"),
    "inspect": ("compress.inspect", "print an artifact's manifest and lineage, verify every hash"),
    "distill": ("compress.distill", "train a smaller student from a teacher"),
    "prune": ("compress.prune", "structured and unstructured pruning"),
    "quantize": ("compress.quantize", "GPTQ, RTN, dynamic INT8, fp16/bf16"),
    "evaluate": ("compress.evaluate", "accuracy against speed, beside the reference"),
    "speed": ("compress.speed", "speed of one artifact (what evaluate runs per artifact)"),
    "pipeline": ("compress.pipeline", "run a recipe of steps (configs/pipeline/*.yaml)"),
    "onnx": ("export.onnx", "export a KV-cached ONNX decoder"),
    "tensorrt-llm": ("export.tensorrt_llm", "export a TensorRT-LLM checkpoint (+ build.sh)"),
    "bundle": ("export.bundle", "the hand-off tarball for a deployment team"),
    "registry": ("export.registry", "push / pull / list artifacts in an MLflow registry"),
    "generate": ("runtime.generate", "generate text from an artifact"),
    "serve": ("runtime.serve", "OpenAI-compatible server"),
    "bench": ("runtime.bench", "load-test the server"),
}
ALIASES = {module: name for name, (module, _) in COMMANDS.items()}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: shrinkwrap COMMAND [--help] [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}  (python -m {module})" for name, (module, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name = ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    run_main(module.main, argv[1:])


if __name__ == "__main__":
    main()
