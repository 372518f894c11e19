import concurrent.futures
import re
import time

import httpx
import openai
import pytest
import torch

from compress.artifact import open_artifact, write_artifact
from compress.models import describe_model
from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tests.runtime.server_helpers import running_server

MODEL = "tiny"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    out = tmp_path_factory.mktemp("serve") / "tiny"
    with write_artifact(out, "reference", "tests", {}, extra={"model": describe_model(model)}) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return open_artifact(out)


@pytest.fixture(scope="module", params=[False, True], ids=["scheduler-thread", "engine-process"])
def server(artifact, request):
    """Every server test runs against both: the scheduler on a thread, and in a process of its own."""
    with running_server(str(artifact.path), model_name=MODEL, max_model_len=96, engine_process=request.param) as (
            url, srv):
        yield url, srv


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_openai_client_completion_chat_and_streaming(server, artifact):
    url, srv = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="The president said", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 8
    # the same greedy tokens as a plain loop over the model
    from compress.models import load_artifact_model

    model = load_artifact_model(artifact.path)
    ids = torch.tensor([srv.tokenizer("The president said", add_special_tokens=False)["input_ids"]])
    out = []
    with torch.no_grad():
        for _ in range(done.usage.completion_tokens):
            out.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    assert done.choices[0].text == srv.tokenizer.decode(out, skip_special_tokens=True)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, seed=3, temperature=0.8, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True)]
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=6, temperature=0)
    assert "".join(pieces) == plain.choices[0].message.content
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The president said", max_tokens=8, temperature=0, stream=True))
    assert streamed == done.choices[0].text


def test_stop_strings_cut_the_text(server):
    url, _ = server
    full = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 20,
                                                     "temperature": 0}).json()["choices"][0]["text"]
    stop = full.strip()[3:5]
    cut = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 20,
                                                    "temperature": 0, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.find(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("body,param", [
    ({"model": "nope", "prompt": "hi"}, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 1000}, None),
    ({"model": MODEL, "prompt": "word " * 200}, None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": [1, 2, 10**9]}, None),
    ({"model": MODEL}, "prompt"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
])
def test_bad_requests_get_400_with_an_openai_error(server, body, param):
    url, _ = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert param in error["param"]


def test_malformed_json_gets_400(server):
    url, _ = server
    response = httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()


def test_disconnected_stream_frees_its_blocks(server):
    url, _ = server
    before = metric(url, "shrinkwrap_cancelled_requests_total")
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 90,
                                                             "temperature": 0.7, "seed": 1, "stream": True}) as response:
        lines = response.iter_lines()
        chunks = [next(lines) for _ in range(6)]
        assert any(c.startswith("data: ") for c in chunks)
        assert metric(url, "shrinkwrap_kv_blocks_used") > 0
    deadline = time.monotonic() + 10
    while metric(url, "shrinkwrap_kv_blocks_used") > 0 or metric(url, "shrinkwrap_cancelled_requests_total") == before:
        assert time.monotonic() < deadline, "blocks not freed after the client went away"
        time.sleep(0.05)


@pytest.mark.parametrize("engine_process", [False, True])
def test_full_queue_gets_429_and_nothing_fails(artifact, engine_process):
    with running_server(str(artifact.path), model_name=MODEL, max_running=1, max_queue=1,
                        engine_process=engine_process) as (url, _):
        def one(_):
            return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 150,
                                                             "temperature": 0.9}, timeout=60).status_code
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(8)))
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes


def test_speculative_server_matches_the_plain_one(artifact, tmp_path_factory):
    """The target as its own draft: same greedy text, every proposal accepted (via /metrics)."""
    body = {"model": MODEL, "prompt": "The president said", "max_tokens": 12, "temperature": 0}
    with running_server(str(artifact.path), model_name=MODEL) as (url, _):
        plain = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
    with running_server(str(artifact.path), model_name=MODEL, draft=str(artifact.path), k=3) as (url, _):
        spec = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
        assert metric(url, "shrinkwrap_speculative_acceptance_rate") == 1.0
        assert metric(url, "shrinkwrap_draft_calls_total") > 0 and metric(url, "shrinkwrap_draft_seconds_total") > 0
    assert spec == plain


def test_multi_step_bursts_stream_the_same_answers(artifact):
    """--decode-steps 6 (the scheduler in its own process, as on CUDA): tokens arrive in bursts (several per
    SSE chunk) and the answers, streamed or not, equal the one-step server's, also with concurrent clients."""
    prompts = ["The river", "A new report on the", "Fire crews said", "It was"]

    def answers(url: str) -> list[tuple[str, str]]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")

        def one(prompt: str) -> tuple[str, str]:
            plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=17, temperature=0)
            chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=17, temperature=0,
                                                    stream=True))
            return plain.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, prompts))

    with running_server(str(artifact.path), model_name=MODEL, response_cache=0) as (url, _):
        single = answers(url)
    with running_server(str(artifact.path), model_name=MODEL, response_cache=0, decode_steps=6,
                        engine_process=True) as (url, srv):
        bursts = answers(url)
        stats = srv.scheduler.stats
        assert stats.generated_tokens > 1.5 * stats.steps  # one token per step without the bursts
    assert bursts == single and all(plain == streamed for plain, streamed in single)


def test_a_dead_engine_process_ends_its_streams_and_fails_health(artifact):
    """The scheduler's process killed mid-answer: the open stream ends (finish_reason "abort") instead of
    hanging, /health turns 503 and a new request gets 503 in one line."""
    with running_server(str(artifact.path), model_name=MODEL, engine_process=True) as (url, srv):
        assert httpx.get(f"{url}/health").status_code == 200
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 90,
                                                                 "temperature": 0.7, "stream": True},
                          timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            srv.scheduler.process.kill()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and any('"finish_reason":"abort"' in r.replace(" ", "") for r in rest)
        assert httpx.get(f"{url}/health").status_code == 503
        failed = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 4})
        assert failed.status_code == 503 and "engine process" in failed.json()["error"]["message"]


def test_two_front_end_processes_share_one_engine_queue_and_metrics(artifact):
    """--api-processes 2: two HTTP front ends over one engine process. Answers equal the one-process
    server's, the queue bound holds over both (429 beyond max_running + max_queue in flight, wherever a
    request lands), /metrics counts every front end's responses, and when the supervisor is killed outright
    its front ends and engine stop by themselves and leave no metrics folder (SIGTERM's clean stop: every
    `server_process`)."""
    import os
    import signal

    import psutil

    from tests.runtime.server_helpers import server_process

    prompts = ["The river", "A new report on the", "Fire crews said", "It was"]

    def greedy(url: str) -> list[str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                                     temperature=0).choices[0].text, prompts))

    with running_server(str(artifact.path), model_name=MODEL) as (url, _):
        single = greedy(url)
    with server_process(str(artifact.path), "--model-name", MODEL, "--api-processes", "2", "--max-running", "1",
                        "--max-queue", "1", "--response-cache", "0") as (url, children):
        assert sum("front end" in p.environ().get("SHRINKWRAP_ROLE", "") for p in children) == 2
        assert greedy(url) == single

        def one(_):
            return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "The", "max_tokens": 150,
                                                             "temperature": 0.9}, timeout=60).status_code

        def responses() -> dict[str, float]:
            text = httpx.get(f"{url}/metrics").text
            return {status: float(re.search(rf'^shrinkwrap_responses_total{{status="{status}"}} (\S+)$', text,
                                            re.M).group(1)) for status in ("200", "429")}

        before = responses()  # the SDK retries a 429 on its own: count from here
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(16)))
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        after = responses()
        assert {s: after[s] - before[s] for s in after} == {"200": codes.count(200), "429": codes.count(429)}
        # SIGKILL leaves the supervisor no chance to stop its children: they must stop themselves, and
        # remove the metrics folder it made
        metrics_dir = next(p.environ()["PROMETHEUS_MULTIPROC_DIR"] for p in children
                           if "front end" in p.environ().get("SHRINKWRAP_ROLE", ""))
        assert os.listdir(metrics_dir)
        os.kill(children[0].ppid(), signal.SIGKILL)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert not os.path.exists(metrics_dir)


def test_front_end_count_defaults_by_device_and_needs_the_engine_process():
    from core.errors import UserError
    from runtime.serve import ServeConfig

    def resolved(**options) -> int:
        cfg = ServeConfig(artifact="a", **options)
        cfg.validate()
        return cfg.api_processes

    assert resolved(device="cuda") == 2 and resolved(device="cpu") == 1
    assert resolved(device="cuda", engine_process=False) == 1 and resolved(device="cpu", api_processes=3) == 3
    with pytest.raises(UserError, match="api_processes"):
        resolved(api_processes=2, engine_process=False)
    with pytest.raises(UserError, match="api_processes"):
        resolved(api_processes=0)
