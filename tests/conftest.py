"""Shared fixtures: tiny random Llama models with a real (small) tokenizer, and the real reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # the fused CUDA kernels run in Triton's interpreter; set before anything
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (torch's compiler stack included) imports triton
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each, so
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # they (and the servers they start) do not oversubscribe
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on the corpus's train split in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from core.data import load_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_corpus("train"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_target_and_exit(after_exit: float = 0.3):
    """A 4-layer target whose greedy output varies and an exit head at layer 2 (the identity adapter: the
    target's own norm and LM head on layer 2); the layers after it scaled by `after_exit` (0: the exit is the
    target, every proposal accepted; 0.3: some accepted, some not)."""
    from runtime.exit_head import new_exit_head

    target = make_tiny_llama(vocab_size=300, hidden=96, layers=4, heads=6, kv_heads=2, tie=False, seed=1)
    with torch.no_grad():
        for layer in target.model.layers[2:]:
            layer.self_attn.o_proj.weight.mul_(after_exit)
            layer.mlp.down_proj.weight.mul_(after_exit)
    return target, new_exit_head(target, 2).eval()


FAMILY_EXTRAS = {  # what each family's tiny test model sets beyond the shared shape
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 16,
               "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "gpt2": {},  # no adapter: the fallback, which must refuse what needs one
}


def make_tiny_family(model_type: str, vocab_size: int = 512, layers: int = 3, seed: int = 0, tie: bool = False):
    """A random-init model of `model_type` (hidden 64, 4 query heads over 2 KV heads), small windows so
    the tests' sequences cross them; weights scaled up so greedy choices are not near-ties."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    shape = {"intermediate_size": 128, "num_key_value_heads": 2} if model_type != "gpt2" else {}  # GPT-2: MHA
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, max_position_embeddings=1024, tie_word_embeddings=tie,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape, **FAMILY_EXTRAS[model_type])
    if model_type == "qwen2":
        config.attention_bias = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and model_type.startswith("gemma"):
                p.normal_(0, 0.3)  # (1 + w): random w tests the offset
            elif name.endswith("norm.weight"):
                p.normal_(1, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding, the full sequence re-run each step: what the engines must reproduce."""
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def save_reference(path: Path, model, tokenizer):
    """`model` and `tokenizer` written as a `reference` artifact at `path` (opened)."""
    from compress.artifact import open_artifact, write_artifact
    from compress.models import describe_model

    with write_artifact(path, "reference", "tests", {}, extra={"model": describe_model(model)}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return open_artifact(path)


def make_ragged_artifact(path: Path, tokenizer, heads: int, kv_heads: int):
    """hidden 96, intermediate 160: group size 64 leaves a partial last group in every projection."""
    from compress.artifact import open_artifact, write_artifact
    from compress.models import describe_model

    model = make_tiny_llama(vocab_size=len(tokenizer), hidden=96, heads=heads, kv_heads=kv_heads, intermediate=160)
    with write_artifact(path, "reference", "tests", {}, extra={"model": describe_model(model)}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return open_artifact(path)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture()
def tiny_artifact(tmp_path, tiny_tokenizer):
    """A `reference` artifact holding a tiny random Llama."""
    from compress.artifact import open_artifact, write_artifact
    from compress.models import describe_model

    model = make_tiny_llama(vocab_size=len(tiny_tokenizer))
    out = tmp_path / "tiny-ref"
    with write_artifact(out, "reference", "tests", {"seed": 0}, extra={"model": describe_model(model)}) as tmp:
        model.save_pretrained(tmp)
        tiny_tokenizer.save_pretrained(tmp)
    return open_artifact(out)


@pytest.fixture(scope="session")
def reference_artifact():
    """The real SmolLM2 reference, built once and cached under artifacts/ (shared by all slow tests)."""
    from filelock import FileLock

    from compress.reference import ReferenceConfig, make_reference

    out = ROOT / "artifacts" / "reference"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):  # the other test worker waits rather than building it a second time
        return make_reference(ReferenceConfig(out=str(out), if_missing=True))


def fit_on_one_batch(module, vocab_size: int = 128, steps: int = 60, lr: float = 3e-3) -> tuple[dict, dict]:
    """A head's training module (`module.losses(ids)`, `module.head`) fitted to one random batch: its losses
    before and after, for tests that it learns."""
    ids = torch.randint(0, vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in module.head.parameters() if p.requires_grad], lr=lr)
    before = module.losses(ids)
    for _ in range(steps):
        opt.zero_grad()
        module.losses(ids)["loss"].backward()
        opt.step()
    return before, module.losses(ids)
