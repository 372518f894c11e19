"""OpenAI API fidelity of runtime.serve: what real clients send, what they get back (tiny random model)."""

import concurrent.futures
import json
import math

import httpx
import openai
import pytest
import torch

from compress.models import load_artifact_model
from tests.runtime.server_helpers import running_server
from tests.runtime.test_serve import MODEL, artifact, metric  # noqa: F401 - the module-scoped fixture

PROMPT = "The president said"


@pytest.fixture(scope="module")
def server(artifact):  # noqa: F811
    with running_server(str(artifact.path), model_name=MODEL, max_model_len=96) as (url, srv):
        yield url, srv


@pytest.fixture(scope="module")
def model(artifact):  # noqa: F811
    return load_artifact_model(artifact.path)


def post(url: str, body: dict, chat: bool = False) -> httpx.Response:
    return httpx.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body, timeout=60)


def test_response_cache_never_answers_a_sampled_request_with_the_greedy_text(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12}
    before = [post(url, {**body, "temperature": 1.0, "seed": s}).json()["choices"][0]["text"] for s in (1, 2, 3)]
    hits = metric(url, "shrinkwrap_response_cache_hits_total")
    greedy = post(url, {**body, "temperature": 0}).json()["choices"][0]["text"]
    after = [post(url, {**body, "temperature": 1.0, "seed": s}).json()["choices"][0]["text"] for s in (1, 2, 3)]
    assert after == before and greedy not in after  # seeded sampling is reproducible and never cached
    assert metric(url, "shrinkwrap_response_cache_hits_total") == hits
    assert post(url, {**body, "temperature": 0}).json()["choices"][0]["text"] == greedy
    assert metric(url, "shrinkwrap_response_cache_hits_total") == hits + 1
    # every setting is in the key: a different max_tokens, stop, bias or logprobs is not served from it
    for change in ({"max_tokens": 5}, {"stop": ["xq"]}, {"logit_bias": {"7": 5}}, {"logprobs": 2}):
        post(url, {**body, "temperature": 0, **change})
    assert metric(url, "shrinkwrap_response_cache_hits_total") == hits + 1


def test_response_cache_under_concurrent_clients(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "In the morning", "max_tokens": 10, "temperature": 0, "logprobs": 1}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(url, body).json()["choices"][0], range(24)))
    # requests that overlap are computed in different batch compositions: same tokens, logprobs equal to
    # float rounding; the ones served from the cache repeat the stored answer exactly
    assert all(a["text"] == answers[0]["text"] for a in answers)
    for a in answers:
        assert a["logprobs"]["token_logprobs"] == pytest.approx(answers[0]["logprobs"]["token_logprobs"], abs=1e-5)
    assert post(url, body).json()["choices"][0] in answers


@pytest.mark.parametrize("body,chat", [
    ({"prompt": "\udcff\u0000\u202e"}, False),
    ({"prompt": ["fine", "\ud800"]}, False),
    ({"messages": [{"role": "user", "content": "\udcff"}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}, True),
    ({"prompt": "hi", "stop": ["\udcff"]}, False),
])
def test_lone_surrogates_are_a_400_not_a_500(server, body, chat):
    url, _ = server
    raw = json.dumps({"model": MODEL, "max_tokens": 3, **body})  # ensure_ascii: "\udcff" escapes stay in the JSON
    path = "chat/completions" if chat else "completions"
    response = httpx.post(f"{url}/v1/{path}", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "Unicode" in response.json()["error"]["message"]


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": []}, "functions"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_unsupported_or_invalid_chat_parameters_are_named(server, extra, param):
    url, _ = server
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra})
    response = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param), response.json()


@pytest.mark.parametrize("extra,param", [
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
])
def test_unsupported_or_invalid_completion_parameters_are_named(server, extra, param):
    url, _ = server
    response = post(url, {"model": MODEL, "prompt": "hi", **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param), response.json()


def test_completion_logprobs_and_echo_match_the_model(server, model):
    url, srv = server
    done = post(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3,
                      "echo": True}).json()["choices"][0]
    prompt = srv.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert done["text"].startswith(PROMPT)
    lp = done["logprobs"]
    n_prompt = len(prompt)
    generated = lp["tokens"][n_prompt:]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids = srv.tokenizer(done["text"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expect = [float(logp[i, t]) for i, t in enumerate(ids[1:])]
    assert lp["token_logprobs"][1:] == pytest.approx(expect, abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(float(logp[i].max()), abs=1e-4)
    assert "".join(generated) == done["text"][len(PROMPT):]
    assert lp["text_offset"][n_prompt] == len(PROMPT)
    # greedy: each generated token is its position's top alternative (what lm-eval's is_greedy checks)
    for token_lp, top in zip(lp["token_logprobs"][n_prompt:], lp["top_logprobs"][n_prompt:], strict=True):
        assert token_lp == max(top.values())
    # max_tokens 0 with echo scores the prompt only
    scored = post(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert scored["choices"][0]["text"] == PROMPT and scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:n_prompt]


def test_batched_prompts_answer_in_order(server):
    url, srv = server
    prompts = ["The president said", "Police say", "In the morning"]
    single = [post(url, {"model": MODEL, "prompt": p, "max_tokens": 5, "temperature": 0}).json()["choices"][0]["text"]
              for p in prompts]
    batch = post(url, {"model": MODEL, "prompt": prompts, "max_tokens": 5, "temperature": 0, "n": 2}).json()
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    assert [c["text"] for c in batch["choices"]] == [t for t in single for _ in range(2)]
    ids = [srv.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_ids = post(url, {"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0}).json()
    assert [c["text"] for c in by_ids["choices"]] == single
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_chat_content_parts_logprobs_and_max_completion_tokens(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
                                           max_completion_tokens=7, temperature=0, logprobs=True, top_logprobs=2)
    parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                            {"type": "text", "text": "there"}]}],
        max_completion_tokens=7, temperature=0)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert plain.usage.completion_tokens <= 7
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(plain.choices[0].message.content)
    assert all(len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob for c in content)
    assert all(bytes(c.bytes).decode() == c.token for c in content)


def test_penalties_and_logit_bias_take_effect(server):
    url, srv = server
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    forced = srv.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    biased = post(url, {**body, "logit_bias": {str(forced): 100}, "logprobs": 0}).json()["choices"][0]
    assert biased["logprobs"]["tokens"] == [srv.token_text(forced)] * 8
    def distinct(extra: dict) -> int:
        choice = post(url, {**body, "max_tokens": 30, "logprobs": 0, **extra}).json()["choices"][0]
        return len(set(choice["logprobs"]["tokens"]))

    # the random model repeats itself; penalties on repeated tokens force new ones
    assert distinct({"frequency_penalty": 2.0, "presence_penalty": 2.0}) > 2 * distinct({})


def test_streaming_carries_the_same_fields(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                      echo=True)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                            echo=True, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    token_lps = [t for c in chunks if c.choices and c.choices[0].logprobs
                 for t in c.choices[0].logprobs.token_logprobs]
    assert text == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens
    assert token_lps == whole.choices[0].logprobs.token_logprobs
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    chat_chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=1, stream=True))
    streamed = [lp.token for c in chat_chunks if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.content]
    whole_chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, logprobs=True, top_logprobs=1)
    assert streamed == [c.token for c in whole_chat.choices[0].logprobs.content]
    assert all(math.isfinite(c.logprob) for c in whole_chat.choices[0].logprobs.content)
