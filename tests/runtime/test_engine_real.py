"""The engine on the real SmolLM2 reference (slow)."""

import pytest
import torch

from core.data import chat_prompts
from runtime.engine import Engine, SamplingParams
from runtime.loading import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(reference_artifact):
    from transformers import AutoTokenizer

    return load_model(reference_artifact.path), AutoTokenizer.from_pretrained(reference_artifact.path)


def test_batched_greedy_equals_hf_generate_for_mixed_length_chat_prompts(real):
    model, tokenizer = real
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chat_prompts(tokenizer, 8, words=10)]
    prompts = [p[: 20 + 9 * i] for i, p in enumerate(prompts)]  # mixed lengths
    outputs, _ = Engine(model, block_size=16, num_blocks=256).generate(prompts, SamplingParams(max_new_tokens=12))
    for prompt, out in zip(prompts, outputs, strict=True):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert out == ref


def test_speculative_with_layer_drop_draft_keeps_target_greedy(real):
    from compress.distill import evenly_spaced_layers
    from compress.surgery import keep_layers

    model, tokenizer = real
    draft = keep_layers(model, evenly_spaced_layers(30, 15))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    target = Engine(model, block_size=16, num_blocks=128)
    out, stats = target.speculative(Engine(draft, block_size=16, num_blocks=128), ids,
                                    SamplingParams(max_new_tokens=10), k=3)
    plain, _ = target.generate([ids], SamplingParams(max_new_tokens=10))
    assert out == plain[0] and "Paris" in tokenizer.decode(out)
