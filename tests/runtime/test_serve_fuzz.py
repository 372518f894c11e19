"""Schema fuzz of both endpoints: no body, however malformed, gets a status >= 500.

Bodies: hypothesis-built requests around the real schema (wrong types, invalid Unicode with lone
surrogates, huge integers, NaN/Infinity, deep nesting, very long strings, unknown parameters),
plus hand-written raw bodies that no JSON encoder would produce.
"""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.server_helpers import running_server
from tests.runtime.test_serve import MODEL, artifact  # noqa: F401 - the module-scoped fixture

EXAMPLES = 250  # per endpoint
TRIED = {"bodies": 0}

any_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=30)  # surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.sampled_from([10**400, -(10**400), 2**63, 2**64])
    | st.floats(allow_nan=True, allow_infinity=True) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4), max_leaves=10)
common = {
    "model": st.just(MODEL) | json_values,
    "max_tokens": st.integers(-3, 40) | json_values,
    "temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-0.5, 1.5) | json_values,
    "top_k": st.integers(-2, 10**20), "n": st.integers(-1, 4) | json_values,
    "stop": any_text | st.lists(any_text, max_size=6) | json_values,
    "seed": st.integers(-(2**64), 2**64) | json_values, "stream": st.booleans() | json_values,
    "priority": st.integers(-2000, 2000), "presence_penalty": st.floats() | json_values,
    "frequency_penalty": st.floats(-3, 3), "user": any_text | json_values,
    "logit_bias": st.dictionaries(st.integers(-5, 10**6).map(str) | any_text, st.floats(-200, 200) | json_values,
                                  max_size=3) | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | json_values}) | json_values,
    "tools": json_values, "response_format": st.just({"type": "text"}) | json_values,
}
completion = {**common, "prompt": any_text | st.text(max_size=3000) | st.lists(any_text, max_size=3)
              | st.lists(st.integers(-5, 600), max_size=20) | st.lists(st.lists(st.integers(0, 600), max_size=5),
                                                                      max_size=3) | json_values,
              "echo": st.booleans() | json_values, "logprobs": st.integers(-2, 30) | json_values,
              "best_of": st.integers(0, 5) | json_values, "suffix": st.none() | any_text}
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_values, "text": any_text})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "bot"]),
                                 "content": any_text | st.lists(part, max_size=3) | json_values},
                                optional={"name": any_text | json_values})
chat = {**common, "messages": st.lists(message, max_size=3) | json_values,
        "logprobs": st.booleans() | json_values, "top_logprobs": st.integers(-2, 30) | json_values,
        "max_completion_tokens": st.integers(-2, 40) | json_values}


@pytest.fixture(scope="module")
def server(artifact):  # noqa: F811
    with running_server(str(artifact.path), model_name=MODEL, max_model_len=64) as (url, srv):
        yield url, srv


def send(url: str, path: str, content: bytes) -> httpx.Response:
    TRIED["bodies"] += 1
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=120)


def check(response: httpx.Response, body) -> None:
    assert response.status_code < 500, (str(body)[:500], response.text[:500])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional=completion))
def test_fuzzed_completions(server, body):
    url, _ = server
    check(send(url, "/v1/completions", json.dumps(body).encode()), body)  # NaN/Infinity go out as JSON literals


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({}, optional=chat))
def test_fuzzed_chat(server, body):
    url, _ = server
    check(send(url, "/v1/chat/completions", json.dumps(body).encode()), body)


RAW = [
    b"", b"null", b"[]", b'"text"', b"{", b'{"model": "tiny", "prompt": ', b"\xff\xfe\x00garbage",
    b'{"model": "tiny", "prompt": "\xff\xfe"}',  # not UTF-8
    b'{"model": "tiny", "prompt": "\\udcff\\u0000\\u202e"}', b'{"model": "tiny", "prompt": "\\ud800\\udc00\\ud800"}',
    b'{"model": "tiny", "prompt": "hi", "max_tokens": 1e999999}',
    b'{"model": "tiny", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', b'{"model": "tiny", "prompt": "hi", "top_p": -Infinity}',
    b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "tiny", "prompt": "' + b"a" * 2_000_000 + b'", "max_tokens": 1}',
    b'{"model": "tiny", "prompt": [' + b",".join([b"5"] * 100_000) + b'], "max_tokens": 1}',
    b'{"model": "tiny", "prompt": "hi", "logit_bias": {"' + b"1" * 400 + b'": 1}}',
    b'{"model": "tiny", "prompt": "hi", "model": "tiny", "prompt": 5}',
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_raw_bodies(server, path):
    url, _ = server
    for raw in RAW:
        check(send(url, path, raw), raw)


def test_the_fuzz_ran(server):
    """The count the closing note reports (the fuzz tests above ran first in this module)."""
    print(f"fuzz: {TRIED['bodies']} bodies sent")
    assert TRIED["bodies"] >= 2 * EXAMPLES + 2 * len(RAW)
