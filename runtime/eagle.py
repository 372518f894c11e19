"""EAGLE draft heads: one decoder layer that reads the target's last hidden state and the next token.

EAGLE (Li et al., 2024) drafts at the feature level: from the target's final-norm hidden state at
position i (its "feature", what the LM head reads) and the embedding of token i + 1, one decoder
layer predicts the feature at i + 1, and the target's own LM head turns that into the distribution
of token i + 2. The head's layer keeps its own small KV cache; after each verification the target's
true features replace the drafted ones. The head shares the target's embedding and LM head, so a
draft artifact holds only `fc` ([embedding; feature] -> layer input), the layer and its norm, and
optionally `vocab_ids`: the draft's LM head restricted to the target's most frequent tokens
(FR-Spec / EAGLE-3's reduced draft vocabulary; at 135M parameters the 49k-row head is most of a
one-layer draft's weight traffic). Verification is the target's, so what the draft proposes only
changes the speed, never the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError

WEIGHTS = "model.safetensors"


class EagleHead(nn.Module):
    """Shaped like a causal LM (`config`, `model` with one layer, `lm_head`) so `StaticDecoder` can run its layer."""

    def __init__(self, config, embed: torch.Tensor, lm_head: torch.Tensor, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if config.num_hidden_layers < 1:
            raise ValueError("an EAGLE head needs at least one layer")
        lm = AutoModelForCausalLM.from_config(config)
        self.config, self.model = config, lm.model
        self.model.embed_tokens.weight = nn.Parameter(embed, requires_grad=False)  # the target's, shared
        head = lm_head if vocab_ids is None else lm_head[vocab_ids.to(lm_head.device)]
        self.lm_head = nn.Linear(head.shape[1], head.shape[0], bias=False, device=head.device, dtype=head.dtype)
        self.lm_head.weight = nn.Parameter(head, requires_grad=False)
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                past_key_values=None) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, hidden) of positions i, tokens (B, T) at i + 1 -> predicted features of i + 1 and
        their draft logits (over `vocab_ids` where set)."""
        x = self.fc(torch.cat([self.model.embed_tokens(tokens), features.to(self.fc.weight.dtype)], dim=-1))
        out = self.model(inputs_embeds=x, position_ids=position_ids, past_key_values=past_key_values,
                         use_cache=past_key_values is not None)
        h = out.last_hidden_state
        return h, self.lm_head(h)

    def full_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the whole vocabulary (-inf outside `vocab_ids`)."""
        if self.vocab_ids is None:
            return draft_logits
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.model.embed_tokens.weight.shape[0]),
                                     float("-inf"))
        return full.index_copy(-1, self.vocab_ids.to(full.device), draft_logits)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a draft artifact stores: fc, the layers and the norm (not the target's embedding or LM head)."""
        state = {f"fc.{k}": v for k, v in self.fc.state_dict().items()}
        state.update({k: v for k, v in self.model.state_dict().items() if not k.startswith("embed_tokens.")})
        if self.vocab_ids is not None:
            state["vocab_ids"] = self.vocab_ids
        return state


def head_config(target_config, layers: int = 1):
    """The target's config with `layers` decoder layers: the head's layer has the target's shape."""
    config = type(target_config).from_dict(target_config.to_dict())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    config.use_cache = True
    return config


def new_head(target: nn.Module, layers: int = 1, vocab_ids: torch.Tensor | None = None) -> EagleHead:
    """A head for `target`: its layer starts as a copy of the target's last layer, `fc` as the sum of the
    embedding and the feature halves scaled by 1/2 (training moves both)."""
    head = EagleHead(head_config(target.config, layers), target.model.embed_tokens.weight.detach(),
                     target.lm_head.weight.detach(), vocab_ids)
    last = target.model.layers[-1].state_dict()
    for layer in head.model.layers:
        layer.load_state_dict(last)
    head.model.norm.load_state_dict(target.model.norm.state_dict())
    hidden = target.config.hidden_size
    with torch.no_grad():
        eye = torch.eye(hidden) * 0.5
        head.fc.weight.copy_(torch.cat([eye, eye], dim=1))
    param = next(target.parameters())
    return head.to(device=param.device, dtype=param.dtype)


def draft_method(path: str | Path) -> str | None:
    """The `compress.draft` method a draft artifact was made with (None: not a readable draft manifest)."""
    manifest = Path(path) / "shrinkwrap.json"
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("draft", {}).get("method")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def is_eagle_draft(path: str | Path) -> bool:
    return draft_method(path) == "eagle"


def load_head(path: str | Path, target: nn.Module, vocab_ids: torch.Tensor | None = None) -> EagleHead:
    """The EAGLE head of a draft artifact, on the target's device and dtype, sharing its embedding and LM head
    (`vocab_ids`: propose only these tokens, in place of the artifact's draft vocabulary)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path)
        state = load_file(str(path / WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt file
        raise UserError(f"{path}: cannot load the EAGLE head ({type(exc).__name__}: "
                        f"{(str(exc).strip().splitlines() or [''])[0][:200]})") from None
    if config.hidden_size != target.config.hidden_size:
        raise UserError(f"{path}: an EAGLE head of hidden size {config.hidden_size}, the target's is "
                        f"{target.config.hidden_size}")
    stored = state.pop("vocab_ids", None)
    vocab_ids = stored if vocab_ids is None else vocab_ids
    param = next(target.parameters())
    head = EagleHead(config, target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach(), vocab_ids)
    fc = {k.removeprefix("fc."): v for k, v in state.items() if k.startswith("fc.")}
    head.fc.load_state_dict(fc)
    missing, unexpected = head.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")},
                                                     strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens.")]
    if missing or unexpected:
        raise UserError(f"{path}: EAGLE head weights do not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return head.to(device=param.device, dtype=param.dtype).eval()


class EagleDraft:
    """An EAGLE head drafting for one sequence of the paged engine: sampling-exact, any k.

    Used by `Engine.speculative` (which hands it the target's `PagedDecoder`: the features come from the
    runner's last pass) and by the scheduler (which hands it each sequence's rows of a batched pass, and
    one `HeadCache` for all its sequences, so that `propose_greedy` drafts for them together). Its slot
    of the head's cache holds one entry per position whose true feature is known; drafted entries past
    them are overwritten by the next catch-up. Where the prefix cache served part of a prompt, the scheduler
    hands over the features it kept for those blocks (`DraftSteps._give_prefix_features`); failing that,
    the head computes them with one pass of the target (no cache).
    """

    def __init__(self, head: EagleHead, target_runner, cache=None, min_confidence: float = 0.0):
        self.head, self.runner, self.cache = head, target_runner, cache
        self.min_confidence = min_confidence  # greedy: stop drafting before a token the head is less sure of
        target_runner.keep_features = True  # every pass through `_general`, which leaves `features`
        self.tokens: list[int] = []
        self.proposed: list[int] = []
        self.slot: int | None = None

    def begin(self, prompt: list[int], params=None, rows: torch.Tensor | None = None) -> None:
        """A new sequence; `rows`: the features of its last len(rows) prompt positions (default: the runner's
        last pass, the prompt's prefill)."""
        from runtime.eagle_rows import HeadCache

        rows = self.runner.features[0] if rows is None else rows
        self.tokens, self.proposed = list(prompt), []
        self._store = rows.new_empty((max(2 * len(prompt), 64), rows.shape[1]))  # grows by doubling
        self.known = 0  # positions 0..known-1 have their true feature in the store
        if self.cache is None:
            self.cache = HeadCache(self.head, 1, max(256, 2 * len(prompt)))
        if self.slot is None:
            self.slot = self.cache.take()
        self.entries = 0  # cached head entries (positions 0..entries-1), each from a true feature
        if rows.shape[0]:  # none yet (the scheduler): its prompt chunks bring them
            self.extend(rows, len(prompt) - rows.shape[0], len(prompt))

    @property
    def features(self) -> torch.Tensor:
        """The true features known so far, positions 0..known-1."""
        return self._store[:self.known]

    def _append(self, rows: torch.Tensor) -> None:
        """Rows for the next positions, into the store (no copy of what is there, unless it must grow)."""
        end = self.known + rows.shape[0]
        if end > self._store.shape[0]:
            grown = self._store.new_empty((max(2 * self._store.shape[0], end), self._store.shape[1]))
            grown[:self.known] = self.features
            self._store = grown
        self._store[self.known:end] = rows
        self.known = end

    def extend(self, rows: torch.Tensor, start: int, upto: int) -> None:
        """True features: `rows` are positions start..; keep those below `upto` not yet known (a gap before
        `start`, left by the prefix cache, is computed by the target)."""
        if start > self.known:
            with torch.no_grad():
                ids = torch.tensor([self.tokens[:start]], device=rows.device)
                hidden = self.runner.model.model(ids, use_cache=False).last_hidden_state[0]
            self._append(hidden[self.known:start])
        if upto > self.known:
            self._append(rows[self.known - start:upto - start])

    def _step(self, features: torch.Tensor, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head entries for positions start.. (features, and `ids`: the tokens that follow them):
        the last entry's predicted feature (1, hidden) and its draft logits over the whole vocabulary."""
        state, _ = self.cache.rows([self.slot], [features], [ids], [start])
        return state, self.head.full_logits(self.cache.logits(state)[0])

    def can_propose(self) -> bool:
        """False when the target already scored the last token (its next comes first)."""
        return self.known < len(self.tokens)

    def propose(self, k: int, params, gen: torch.Generator | None) -> tuple[list[int], list[torch.Tensor | None]]:
        """Up to k draft tokens and their distributions (greedy: None, a one-hot at the token)."""
        from runtime.eagle_rows import propose_greedy
        from runtime.engine import draw, probabilities

        n = len(self.tokens)
        self.proposed = []
        if not self.can_propose() or k < 1:
            return [], []
        if params.temperature <= 0:
            tokens = propose_greedy([self], [k], self.min_confidence)[0]
            return tokens, [None] * len(tokens)
        # entry i reads the true feature of position i and token i + 1: catch up to the last accepted token
        start = self.entries
        feature, logits = self._step(self.features[start:n - 1], self.tokens[start + 1:n], start)
        self.entries = n - 1
        tokens, qs = [], []
        for j in range(k):
            q = probabilities(logits, params)
            tokens.append(draw(q, gen))
            qs.append(q)
            if j < k - 1:
                feature, logits = self._step(feature, tokens[-1:], n - 1 + j)
        self.proposed = tokens
        return tokens, qs

    def note_proposals(self, tokens: list[int]) -> None:
        """Another drafter proposed `tokens` this cycle: `accept` keeps those the target accepted."""
        self.proposed = list(tokens)

    def accept(self, keep: int, final: int, rows: torch.Tensor | None = None, start: int | None = None) -> None:
        """Keep the first `keep` tokens, then the target's `final`: the drafted entries go, true features come
        (`rows`, positions `start`..: the verify pass's; default: the runner's last pass, from the first
        position without a feature)."""
        self.tokens = (self.tokens + self.proposed)[:keep]
        if rows is None:
            rows = self.runner.features[0]
        self.extend(rows, self.known if start is None else start, keep)
        self.tokens.append(final)
        self.proposed = []

    def release(self) -> None:
        """The sequence is done: its slot goes back to the cache."""
        if self.slot is not None:
            self.cache.give_back(self.slot)
            self.slot = None

    def finish(self) -> None:
        self.release()
        self.runner.keep_features = False


def draft_rows(head_decoder, fc: torch.Tensor, vocab_ids: torch.Tensor | None, features: torch.Tensor,
               tokens: torch.Tensor, eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """T head entries on a `StaticDecoder` of the head (row 0, from its pos/col): features (T, hidden) and
    tokens (T,) -> predicted features (T, hidden) and each row's greedy draft token (T,)."""
    x = torch.cat([F.embedding(tokens, head_decoder.embed), features], dim=-1) @ fc.t()
    hidden = head_decoder.run_rows(x, eager)
    best = head_decoder.greedy(hidden, eager)
    return head_decoder.features(hidden), (best if vocab_ids is None else vocab_ids[best])
