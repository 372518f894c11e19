"""The server on the real SmolLM2 reference (slow)."""

import concurrent.futures

import httpx
import pytest
import torch

from compress.models import load_artifact_model, load_tokenizer
from core.data import load_corpus
from tests.runtime.server_helpers import running_server

pytestmark = pytest.mark.slow


def test_eight_concurrent_greedy_requests_equal_hf_generate(reference_artifact):
    tokenizer = load_tokenizer(reference_artifact.path)
    articles = load_corpus("heldout")[:8]
    questions = [f"In one sentence, what is this about? {' '.join(a.split()[:8 + 6 * i])}"
                 for i, a in enumerate(articles)]  # mixed prompt lengths
    model = load_artifact_model(reference_artifact.path)
    expected = []
    with torch.inference_mode():
        for q in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
            expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    with running_server(str(reference_artifact.path), model_name="smollm2") as (url, server):
        def ask(q):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "smollm2", "messages": [{"role": "user", "content": q}], "max_tokens": 24,
                "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, questions))
        assert server.scheduler.stats.finished_requests == 8
    assert got == expected
