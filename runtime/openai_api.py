"""The OpenAI request schema we accept, the response pieces and error body we return, and incremental
detokenization."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    # strict: "max_tokens": "10" is a wrong type (400), not silently 10; NaN/inf are refused; an unknown
    # parameter is a 400 that names it (a client relying on tools or response_format must not get an
    # answer that silently ignored them)
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


MAX_STOP = 4  # as OpenAI: at most 4 stop sequences
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one batched completion request


class SamplingFields(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, lt=2**31, description="extension: sample among the k most likely tokens")
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for abuse tracking: accepted, not used
    priority: int = Field(0, ge=-1000, le=1000, description="lower is served first (extension)")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit() or len(token) > 9:
                raise ValueError(f"keys are token ids, got {token[:40]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"bias for token {token} must be in [-100, 100]")
        return bias

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def new_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """Top alternatives per token to report (None: no logprobs)."""
        raise NotImplementedError

    def echo_prompt(self) -> bool:
        return False


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo, to score the prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=16)
    suffix: None = None  # insertion is not supported: only null is accepted

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported (no server-side ranking)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only valid with echo (scoring the prompt)")
        if isinstance(self.prompt, list) and len(self.prompt) > 0 and isinstance(self.prompt[0], (str, list)) \
                and len(self.prompt) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt (a string or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [list(self.prompt)]  # one prompt of token ids (an empty list is an empty prompt)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def echo_prompt(self) -> bool:
        return self.echo


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema need constrained decoding, which we do not have


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_completion_tokens: differs from max_tokens (send one of them)")
        return self

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def check_unicode(body: CompletionRequest | ChatRequest) -> None:
    """Strings must be encodable as UTF-8 (JSON admits lone surrogates such as \\udcff; tokenizers do not)."""
    texts: list[tuple[str, str]] = [("stop", s) for s in body.stop_strings()]
    if isinstance(body, ChatRequest):
        texts += [(f"messages.{i}.content", m.text()) for i, m in enumerate(body.messages)]
    else:
        texts += [("prompt", p) for p in body.prompts() if isinstance(p, str)]
    for where, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: not valid Unicode (a lone surrogate)") from None


def completion_logprobs(token_text: Callable[[int], str], entries: list, offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, their logprobs, top alternatives, text offsets."""
    tokens = [token_text(t) for t, _, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top = [None if alts is None else {token_text(i): lp for i, lp in alts} for _, _, alts in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprob(token_text: Callable[[int], str], token: int, logprob: float, top: list) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": token_text(i), "logprob": lp,
                              "bytes": list(token_text(i).encode("utf-8"))} for i, lp in top or []]}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextStream:
    """Token ids -> text deltas, holding back incomplete UTF-8 and anything a stop string may start.

    `push` returns the text that is safe to send; `stopped` is set when a stop string appears, and
    the text before it is all that is ever sent. Decoding is incremental (vLLM's way): each push
    decodes only the tokens since the previous push plus the ones before them (so a tokenizer that
    drops a leading space at the start of what it decodes drops it from both), not the whole answer.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.prefix_at = self.read_at = 0  # tokens[prefix_at:read_at] were decoded last time, as context
        self.sent = 0
        self.text = ""
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        # a fast tokenizer that cleans up no spaces decodes as its Rust backend does: call that directly (the
        # Python wrapper costs more than the decoding, twice per token at every stream)
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = (backend if hasattr(backend, "decode") and not getattr(
            tokenizer, "clean_up_tokenization_spaces", True) else None)

    def _decode(self, tokens: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(tokens, skip_special_tokens=True)
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, *tokens: int) -> str:
        """The text now safe to send after these tokens (several at once: one decoding for them all; a stop
        string is then found in their text, not at the token that completed it)."""
        self.tokens.extend(tokens)
        if self.stopped:
            return ""
        prefix = self._decode(self.tokens[self.prefix_at:self.read_at])
        window = self._decode(self.tokens[self.prefix_at:])
        if window.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next bytes
            return ""
        checked = len(self.text)
        if window.startswith(prefix):
            self.text += window[len(prefix):]
        else:  # a tokenizer whose decoding is not prefix-stable here: decode everything once
            self.text = self._decode(self.tokens)
            checked = 0
        if any(t not in self.special for t in self.tokens[self.read_at:]):  # else keep the context: a decode
            self.prefix_at = self.read_at  # that starts at a skipped special token may drop the next space
        self.read_at = len(self.tokens)
        for stop in self.stops:
            at = self.text.find(stop, max(0, checked - len(stop) + 1))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        limit = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:limit], max(self.sent, limit)
        return delta

    def flush(self) -> str:
        if not self.stopped and self.read_at < len(self.tokens):  # a trailing incomplete character
            self.text += self._decode(self.tokens[self.prefix_at:])[len(self._decode(
                self.tokens[self.prefix_at:self.read_at])):]
            self.read_at = len(self.tokens)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta.rstrip("\ufffd")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
