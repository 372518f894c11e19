"""`python -m runtime.generate`: generate from an artifact with the paged-cache engine.

Prints the completion, then one line of stats: prefill and decode tokens/s and, with --draft,
the acceptance rate and mean tokens per target step of speculative decoding (or, with
--early-exit-threshold, how many tokens the draft emitted alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.config import field, parse_config
from core.errors import UserError, run_main
from runtime.engine import (
    Engine,
    GenerationStats,
    LookupFirstDraft,
    ModelDraft,
    PromptLookupDraft,
    SamplingParams,
)
from runtime.loading import check_draft_target, load_model, load_tokenizer, open_engine


@dataclass
class GenerateConfig:
    artifact: str = field(None, help="model artifact directory")
    prompt: str = field(None, help="prompt text")
    draft: str | None = field(None, help="draft artifact for speculative decoding (same tokenizer)")
    k: int = field(4, help="draft tokens proposed per target step")
    force: bool = field(False, help="use a draft artifact made for another target")
    adaptive_k: bool = field(False, help="grow k after full acceptance, shrink it after a miss")
    draft_confidence: float = field(0.0, help="with an EAGLE --draft, greedy: propose up to k tokens, stopping before "
                                    "the first the head gives a probability below this (0: always k)")
    tree_width: int = field(1, help="with an EAGLE --draft, greedy: draft a tree, the head's chain of k with its next "
                            "width - 1 likeliest tokens beside each, verified in one pass (1: a chain)")
    prompt_lookup: int = field(0, help="draft by prompt lookup: the longest n-gram (n <= this) of the context's end "
                               "found earlier proposes what followed it (0: off); with --draft, lookup first and the "
                               "draft where nothing matches")
    lookup_k: int | None = field(None, help="with --draft and --prompt-lookup: tokens per lookup proposal (default k)")
    early_exit_threshold: float | None = field(None, help="lossy early exit with --draft (an exit-head, early-exit "
                                               "or layers draft): emit the draft's token without the target when "
                                               "its probability is >= this (greedy; no verification)")
    chat: bool = field(False, help="wrap the prompt in the tokenizer's chat template")
    max_tokens: int = field(128, help="new tokens at most")
    temperature: float = field(0.0, help="0 for greedy")
    top_p: float = field(1.0, help="nucleus sampling mass")
    top_k: int = field(0, help="sample from the k most likely tokens (0: all)")
    seed: int | None = field(None, help="random seed for sampling")
    block_size: int = field(16, help="tokens per KV-cache block")
    num_blocks: int = field(512, help="KV-cache blocks in the pool")
    device: str = field("cpu", help="cpu or cuda")
    static: bool = field(False, help="greedy decoding with the static-cache decoder: on CUDA in bf16, replayed "
                         "from a CUDA graph (the fused Triton step for plain Llama-shaped layers)")

    def validate(self) -> None:
        if not self.artifact or self.prompt is None:
            raise UserError("artifact and prompt are required")
        if self.max_tokens < 1 or self.k < 1 or self.block_size < 1 or self.num_blocks < 1:
            raise UserError("max_tokens, k, block_size and num_blocks must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        if self.prompt_lookup < 0 or (self.prompt_lookup and self.draft is not None and (
                self.static or self.early_exit_threshold is not None)):
            raise UserError("prompt_lookup: a positive n-gram length; with --draft only on the paged engine, "
                            "without --static or --early-exit-threshold")
        if self.lookup_k is not None and (self.lookup_k < 1 or not (self.prompt_lookup and self.draft)):
            raise UserError("lookup_k: a positive count, with --draft and --prompt-lookup")
        if self.early_exit_threshold is not None and (
                self.draft is None or self.static or self.temperature > 0 or self.early_exit_threshold <= 0):
            raise UserError("early_exit_threshold: a probability > 0, with --draft, greedy, on the paged engine "
                            "(not --static)")
        if not 0 <= self.draft_confidence < 1 or (self.draft_confidence and (
                self.draft is None or self.static or self.temperature > 0 or self.early_exit_threshold is not None)):
            raise UserError("draft_confidence: a probability in [0, 1); above 0 with an EAGLE --draft, greedy, on the "
                            "paged engine (no --static or --early-exit-threshold)")
        if self.tree_width < 1 or (self.tree_width > 1 and (
                self.draft is None or self.static or self.temperature > 0 or self.prompt_lookup
                or self.early_exit_threshold is not None)):
            raise UserError("tree_width: a positive width; above 1 with an EAGLE --draft, greedy, on the paged engine "
                            "(no --static, --prompt-lookup or --early-exit-threshold)")
        if self.static and (self.temperature > 0 or self.adaptive_k):
            raise UserError("static: the static decoder is greedy with a fixed k (drop --temperature / --adaptive-k)")


def static_generate(cfg: GenerateConfig, ids: list[int], stop: tuple[int, ...]) -> tuple[list[int], GenerationStats]:
    """Greedy tokens from `StaticDecoder` (fused kernels + CUDA graph on CUDA), with the draft if given."""
    from runtime.eagle import is_eagle_draft, load_head
    from runtime.exit_head import is_exit_head
    from runtime.static_decode import StaticDecoder
    from runtime.static_speculative import (
        StaticEagleSpeculator,
        StaticExitSpeculator,
        StaticLookupSpeculator,
        StaticSpeculator,
    )

    cuda = cfg.device.startswith("cuda")
    eagle = cfg.draft is not None and is_eagle_draft(cfg.draft)
    exit_head = cfg.draft is not None and is_exit_head(cfg.draft)
    decoders, models = [], []
    for name in (cfg.artifact, None if eagle or exit_head else cfg.draft):
        if name is None:
            continue
        model = load_model(name, cfg.device, dtype=torch.bfloat16 if cuda else None)
        models.append(model)
        try:
            decoders.append(StaticDecoder.fastest(model, max_batch=1, max_len=len(ids) + cfg.max_tokens + cfg.k))
        except ValueError as exc:
            raise UserError(f"static: {name}: {exc}") from None
    if cfg.prompt_lookup:
        speculator = StaticLookupSpeculator(decoders[0], k=cfg.k, max_ngram=cfg.prompt_lookup)
    elif cfg.draft is None:
        static = decoders[0]
        if cuda:
            static.generate([ids], 2)  # compile the kernels and capture the graph outside the timing
        out = static.generate([ids], cfg.max_tokens)[0]
        cut = next((i + 1 for i, t in enumerate(out) if t in stop), len(out))
        return out[:cut], GenerationStats(prompt_tokens=len(ids), new_tokens=cut, prefill_s=static.timings[0],
                                          decode_s=static.timings[1] * (cut - 1) / max(len(out) - 1, 1))
    elif eagle:
        speculator = StaticEagleSpeculator(decoders[0], load_head(cfg.draft, models[0]), k=cfg.k)
    elif exit_head:
        from runtime.exit_head import load_exit_head

        speculator = StaticExitSpeculator(decoders[0], load_exit_head(cfg.draft, models[0]), k=cfg.k)
    else:
        speculator = StaticSpeculator(*decoders, k=cfg.k)
    if cuda:
        speculator.generate(ids, 2)  # compile and capture outside the timing
    out = speculator.generate(ids, cfg.max_tokens, stop)
    s = speculator.stats
    return out, GenerationStats(prompt_tokens=len(ids), new_tokens=len(out), prefill_s=s.prefill_s, decode_s=s.decode_s,
                                target_steps=s.cycles, proposed=s.cycles * s.k if s.proposed is None else s.proposed,
                                accepted=s.accepted)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(GenerateConfig, argv, "python -m runtime.generate", __doc__.splitlines()[0])
    from runtime.trtllm_backend import import_trtllm, is_trtllm_engine

    engine = is_trtllm_engine(cfg.artifact)
    if engine:
        import_trtllm()  # says what to install before anything else is loaded
        if cfg.static or cfg.prompt_lookup or (cfg.draft is not None and not is_trtllm_engine(cfg.draft)):
            raise UserError("a TensorRT-LLM engine runs plain decoding, or draft-target with --draft another "
                            "engine (no --static/--prompt-lookup)")
    tokenizer = load_tokenizer(cfg.artifact)
    if cfg.draft is not None:
        from runtime.exit_head import is_exit_head

        check_draft_target(cfg.draft, cfg.artifact, cfg.force)
        if not is_exit_head(cfg.draft):  # an exit head runs on the target's own layers and tokens
            draft_tok = load_tokenizer(cfg.draft)
            if draft_tok.get_vocab() != tokenizer.get_vocab():
                raise UserError(f"draft: {cfg.draft} does not share the target's tokenizer")
    if cfg.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"]
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    params = SamplingParams(cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed, stop)
    with torch.inference_mode():
        if cfg.static:
            out, stats = static_generate(cfg, ids, stop)
        elif engine and cfg.draft is not None:  # pragma: no cover - needs TensorRT-LLM
            from runtime.trtllm_backend import TrtllmEngine

            target = TrtllmEngine(cfg.artifact, speculative=True)
            out, stats = target.speculative(TrtllmEngine(cfg.draft, speculative=True), ids, params, cfg.k)
        else:
            target = open_engine(cfg.artifact, cfg.device, cfg.block_size, cfg.num_blocks)
            speculative = cfg.draft is not None or cfg.prompt_lookup > 0
            if speculative and not isinstance(target, Engine):
                raise UserError("draft: speculative decoding runs on the PyTorch engine, not on an ONNX export")
            from runtime.exit_head import exit_early, is_exit_head, load_exit_head, self_speculative

            if not speculative:
                (out,), stats = target.generate([ids], params)
            elif cfg.draft is not None and is_exit_head(cfg.draft):
                if cfg.prompt_lookup or cfg.temperature > 0:
                    raise UserError("draft: an exit head drafts alone, greedy (no --prompt-lookup or --temperature)")
                head = load_exit_head(cfg.draft, target.runner.model)
                out, stats = (self_speculative(target, head, ids, params, cfg.k) if cfg.early_exit_threshold is None
                              else exit_early(target, head, ids, params, cfg.early_exit_threshold))
            else:
                from runtime.eagle import EagleDraft, is_eagle_draft, load_head

                if cfg.draft is None:
                    draft = PromptLookupDraft(cfg.prompt_lookup)
                elif is_eagle_draft(cfg.draft):
                    if cfg.early_exit_threshold is not None:
                        raise UserError("early_exit_threshold: needs an early-exit or layers draft (an EAGLE head "
                                        "reads the target's features, which an exited token does not have)")
                    draft = EagleDraft(load_head(cfg.draft, target.runner.model), target.runner,
                                       min_confidence=cfg.draft_confidence)
                elif cfg.tree_width > 1 or cfg.draft_confidence:
                    raise UserError(f"tree_width / draft_confidence: {cfg.draft} is not an EAGLE head "
                                    "(compress.draft --method eagle)")
                else:
                    draft = Engine(load_model(cfg.draft, cfg.device), cfg.block_size, cfg.num_blocks)
                if cfg.prompt_lookup and cfg.draft is not None:
                    model_draft = ModelDraft(draft) if isinstance(draft, Engine) else draft
                    draft = LookupFirstDraft(PromptLookupDraft(cfg.prompt_lookup), model_draft, cfg.lookup_k)
                if cfg.early_exit_threshold is not None:
                    out, stats = target.early_exit(draft, ids, params, cfg.early_exit_threshold)
                else:
                    out, stats = target.speculative(draft, ids, params, cfg.k, cfg.adaptive_k, cfg.tree_width)
    print(tokenizer.decode(out, skip_special_tokens=True))
    line = (f"[prefill {stats.prompt_tokens / max(stats.prefill_s, 1e-9):.0f} tok/s, "
            f"decode {stats.new_tokens / max(stats.decode_s, 1e-9):.1f} tok/s, {stats.new_tokens} tokens")
    if cfg.static:
        line += ", static decoder"
    if cfg.early_exit_threshold is not None:
        line += (f", early exit at p >= {cfg.early_exit_threshold}: {stats.exited} of {stats.new_tokens} tokens "
                 f"exited, {stats.target_steps} target passes")
    elif cfg.draft is not None or cfg.prompt_lookup:
        line += (f", acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_target_step:.2f} tokens/target step"
                 f", k={cfg.k}{' adaptive' if cfg.adaptive_k else ''}")
        if cfg.tree_width > 1:
            line += f", tree width {cfg.tree_width}: {stats.leaves_accepted} branches ended in a leaf"
    print(line + "]")


if __name__ == "__main__":
    run_main(main)
