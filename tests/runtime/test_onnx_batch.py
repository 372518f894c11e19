"""ONNX exports through the scheduler and the server: batched decode over per-sequence cache slots."""

import concurrent.futures
import time

import httpx
import pytest
import torch

from core.errors import UserError
from export.onnx import OnnxExportConfig, export_onnx
from runtime.engine import SamplingParams
from runtime.onnx_backend import OnnxDecoder
from runtime.onnx_batch import OnnxBatchRunner
from runtime.scheduler import Request, Scheduler
from runtime.serve import ServeConfig, build_server
from tests.conftest import greedy_reference, make_tiny_llama, make_tiny_tokenizer, save_reference
from tests.runtime.server_helpers import running_server
from tests.runtime.test_scheduler import drain, run_greedy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random Llama (GQA) and its fp32 ONNX export (onnxruntime-genai's builder, shared KV buffers)."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer), tie=False)
    root = tmp_path_factory.mktemp("onnx-serve")
    ref = save_reference(root / "ref", model, tokenizer)
    onnx = export_onnx(ref, OnnxExportConfig(artifact=str(ref.path), out=str(root / "onnx")))
    return model, onnx, tokenizer


def test_batched_decode_with_chunked_prefill_equals_greedy(exported):
    model, onnx, _ = exported
    runner = OnnxBatchRunner(OnnxDecoder(onnx.path), slots=4, context=256)
    scheduler = Scheduler(runner, max_context=256, max_running=4, max_batch_tokens=12)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 29, 8, 17, 5, 40)]
    requests = [Request(p, SamplingParams(max_new_tokens=9)) for p in prompts]
    for r in requests[:2]:
        scheduler.submit(r)
    scheduler.step()
    for r in requests[2:]:  # more requests than slots: they wait, then fill the slots that free up
        scheduler.submit(r)
    drain(scheduler, requests)
    for r, p in zip(requests, prompts, strict=True):
        assert r.outputs[0] == greedy_reference(model, p, 9)
    assert runner.pool.used == 0 and scheduler.reserved_blocks == 0


def test_prompt_logprobs_and_sampling_on_onnx(exported):
    model, onnx, _ = exported
    runner = OnnxBatchRunner(OnnxDecoder(onnx.path), slots=2, context=128)
    scheduler = Scheduler(runner, max_context=128, max_running=2, max_batch_tokens=8)
    prompt = list(range(3, 23))
    scored = Request(prompt, SamplingParams(max_new_tokens=3), logprobs=2, prompt_logprobs=True)
    sampled = Request(prompt, SamplingParams(max_new_tokens=5, temperature=1.0, seed=4), n=2)
    for r in (scored, sampled):
        scheduler.submit(r)
    drain(scheduler, [scored, sampled])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + scored.outputs[0]])).logits[0].log_softmax(-1)
    assert [lp for lp, _ in scored.prompt_scores] == pytest.approx(
        [float(logp[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-4)
    assert [lp for _, lp, _ in scored.records[0]] == pytest.approx(
        [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(scored.outputs[0])], abs=1e-4)
    assert [len(o) for o in sampled.outputs] == [5, 5]


def test_server_on_an_onnx_export(exported):
    model, onnx, tokenizer = exported
    prompts = ["The president said", "Police say that the fire", "In", "A spokesman for the company said that"]
    with running_server(str(onnx.path), model_name="onnx", max_running=3) as (url, srv):
        assert isinstance(srv.scheduler.runner, OnnxBatchRunner)

        def ask(prompt: str) -> str:
            body = {"model": "onnx", "prompt": prompt, "max_tokens": 10, "temperature": 0}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(ask, prompts * 2))
        for prompt, text in zip(prompts * 2, texts, strict=True):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tokens = greedy_reference(model, ids, 10)
            tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens
            expect = tokenizer.decode(tokens, skip_special_tokens=True)
            assert text == expect.rstrip("\ufffd")  # the server holds back an unfinished UTF-8 character
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": "onnx", "prompt": "The", "max_tokens": 200,
                                                                 "stream": True}) as response:
            next(response.iter_lines())  # a client that leaves mid-stream
        deadline = time.monotonic() + 10
        while srv.scheduler.pool.used:  # its slot is freed at the next step
            assert time.monotonic() < deadline, "slot not freed after the client left"
            time.sleep(0.05)


def test_onnx_server_refuses_a_draft(exported):
    _, onnx, _ = exported
    with pytest.raises(UserError, match="draft"):
        build_server(ServeConfig(artifact=str(onnx.path), draft=str(onnx.path)))


def test_concat_cache_exports_serve_too(exported, tmp_path):
    pytest.importorskip("onnxscript")
    model, _, tokenizer = exported
    src = save_reference(tmp_path / "ref", model, tokenizer)
    onnx = export_onnx(src, OnnxExportConfig(artifact=str(src.path), out=str(tmp_path / "onnx"), exporter="torch"))
    runner = OnnxBatchRunner(OnnxDecoder(onnx.path), slots=2, context=128)
    assert not runner.shared
    scheduler = Scheduler(runner, max_context=128, max_running=2, max_batch_tokens=8)
    run_greedy(scheduler, model, [list(range(3, 15)), [7, 8, 9]], 6)
