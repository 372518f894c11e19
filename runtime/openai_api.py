"""The OpenAI request schema we accept, the error body we return, and incremental detokenization."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    # strict: "max_tokens": "10" is a wrong type (400), not silently 10; unknown fields are ignored,
    # as clients send options we do not implement (logprobs, user, ...)
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = Field(0, ge=-1000, le=1000, description="lower is served first (extension)")

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextStream:
    """Token ids -> text deltas, holding back incomplete UTF-8 and anything a stop string may start.

    `push` returns the text that is safe to send; `stopped` is set when a stop string appears, and
    the text before it is all that is ever sent.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> str:
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""
        for stop in self.stops:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        limit = len(self.text) if self.stopped else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:limit], max(self.sent, limit)
        return delta

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta.rstrip("\ufffd")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
