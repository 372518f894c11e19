"""compress.draft on a tiny target (configs/draft/smoke.yaml): a `draft` artifact tied to its target by
content hash, with acceptance measured on held-out chat prompts; the runtime refuses it for another target."""

import subprocess
import sys

import pytest

from compress.artifact import open_artifact, write_artifact
from compress.draft import DraftConfig, draft_layers, main, make_draft
from compress.models import describe_model, load_artifact_model
from core.errors import UserError
from runtime.engine import Engine, SamplingParams
from runtime.loading import check_draft_target
from tests.conftest import ROOT, greedy_reference, make_tiny_llama


def test_layers_each_method_starts_from():
    assert draft_layers("early-exit", 30, 4) == [0, 1, 2, 3]  # the target's first layers: LayerSkip's draft
    spread = draft_layers("layers", 30, 4)
    assert len(spread) == 4 and spread[0] == 0 and spread[-1] == 29
    with pytest.raises(UserError, match="layers: a draft must keep fewer"):
        draft_layers("early-exit", 2, 2)


def test_smoke_draft_is_tied_to_its_target_and_measured(tiny_artifact, tmp_path, tiny_tokenizer):
    out = tmp_path / "draft"
    main(["--config", str(ROOT / "configs/draft/smoke.yaml"), "--target", str(tiny_artifact.path), "--out", str(out)])
    draft = open_artifact(out)
    assert draft.kind == "draft" and draft.manifest["parent"]["content_hash"] == tiny_artifact.content_hash
    made = draft.manifest["draft"]
    assert made["target_content_hash"] == tiny_artifact.content_hash and made["target_layers"] == [0]
    metrics = draft.manifest["metrics"]["values"]
    assert "perplexity" in metrics and "kl" in metrics  # the distillation's held-out measurement is kept
    assert 0.0 <= metrics["acceptance_rate"] <= 1.0 and 1.0 <= metrics["tokens_per_target_pass"] <= 4.0
    assert (out.parent / "draft.work").is_dir()  # the target's answers and the trainer's checkpoints
    # greedy speculative decoding with it = the target's greedy output
    target, small = load_artifact_model(tiny_artifact.path).eval(), load_artifact_model(out).eval()
    assert small.config.num_hidden_layers == 1
    prompt = tiny_tokenizer("The river rose after the storm")["input_ids"]
    tokens, _ = Engine(target).speculative(Engine(small), prompt, SamplingParams(max_new_tokens=12), 3)
    assert tokens == greedy_reference(target, prompt, 12)

    other = tmp_path / "other"
    model = make_tiny_llama(vocab_size=len(tiny_tokenizer), seed=5)
    with write_artifact(other, "reference", "tests", {}, extra={"model": describe_model(model)}) as tmp:
        model.save_pretrained(tmp)
        tiny_tokenizer.save_pretrained(tmp)
    check_draft_target(out, tiny_artifact.path, force=False)
    with pytest.raises(UserError, match="was made for target .* pass --force"):
        check_draft_target(out, other, force=False)
    check_draft_target(out, other, force=True)
    refused = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifact", str(other), "--draft", str(out),
                              "--prompt", "Hello", "--max-tokens", "2"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "pass --force" in refused.stderr and "Traceback" not in refused.stderr
    forced = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifact", str(other), "--draft", str(out),
                             "--prompt", "Hello", "--max-tokens", "2", "--force"], capture_output=True, text=True,
                            cwd=ROOT)
    assert forced.returncode == 0, forced.stderr[-500:]

    # the same draft as a lossy early exit: runtime.generate, and its curve in compress.evaluate's report
    base = [sys.executable, "-m", "runtime.generate", "--artifact", str(tiny_artifact.path), "--draft", str(out),
            "--prompt", "The river rose after the storm", "--max-tokens", "8", "--early-exit-threshold"]
    exited = subprocess.run([*base, "0.001"], capture_output=True, text=True, cwd=ROOT)
    assert exited.returncode == 0, exited.stderr[-500:]
    assert "early exit at p >= 0.001: 7 of 8 tokens exited, 0 target passes" in exited.stdout
    refused = subprocess.run([*base, "0.5", "--static"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "early_exit_threshold" in refused.stderr and "Traceback" not in refused.stderr
    from compress.evaluate import EvaluateConfig, evaluate

    report = evaluate(EvaluateConfig(reference=str(tiny_artifact.path), artifacts=[str(tiny_artifact.path)],
                                     out=str(tmp_path / "eval"), max_eval_tokens=256, seq_len=128, new_tokens=6,
                                     threads=1, early_exit=str(out), exit_thresholds=[1.0, 0.001], exit_prompts=1))
    curve = report["early_exit"]
    assert [row["exit_rate"] for row in curve["accuracy"]] == [0.0, 1.0]
    assert curve["speed"]["target_tok_s"] > 0 and curve["speed"]["per_threshold"][0.001]["generated_exit_rate"] > 0.5
    assert "Early exit with" in (tmp_path / "eval" / "report.md").read_text()


def test_bad_config_fails_before_any_work(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="layers: a draft must keep fewer"):
        make_draft(DraftConfig(target=str(tiny_artifact.path), out=str(tmp_path / "d"), method="early-exit", layers=5,
                               accelerator="cpu"))
    with pytest.raises(UserError, match="draft_vocab: .* --method eagle only"):
        make_draft(DraftConfig(target=str(tiny_artifact.path), out=str(tmp_path / "d"), method="layers", draft_vocab=9))
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.work").exists()
    with pytest.raises(SystemExit):  # the CLI lists eagle, early-exit and layers
        main(["--target", str(tiny_artifact.path), "--method", "medusa"])


def test_smoke_eagle_head_is_tied_to_its_target_and_exact(tiny_artifact, tmp_path, tiny_tokenizer):
    """configs/draft/smoke-eagle.yaml: a head with a 200-token draft vocabulary; greedy speculative decoding with
    it (paged engine, and the static decoder through runtime.generate) is the target's greedy output."""
    from safetensors import safe_open

    from runtime.eagle import EagleDraft, load_head

    out = tmp_path / "eagle"
    main(["--config", str(ROOT / "configs/draft/smoke-eagle.yaml"), "--target", str(tiny_artifact.path),
          "--out", str(out)])
    draft = open_artifact(out)
    made = draft.manifest["draft"]
    assert draft.kind == "draft" and made["method"] == "eagle" and made["draft_vocab"] == 200
    assert made["target_content_hash"] == tiny_artifact.content_hash and made["head_layers"] == 1
    metrics = draft.manifest["metrics"]["values"]
    assert 0.0 <= metrics["acceptance_rate"] <= 1.0 and 0.0 <= metrics["draft_top1"] <= 1.0
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # no embedding or LM head of its own
        names = f.keys()
        assert not any("embed" in k or "lm_head" in k for k in names)
        assert f.get_tensor("vocab_ids").shape == (200,)
    target = load_artifact_model(tiny_artifact.path).eval()
    head = load_head(out, target)
    prompt = tiny_tokenizer("The river rose after the storm")["input_ids"]
    engine = Engine(target)
    tokens, _ = engine.speculative(EagleDraft(head, engine.runner), prompt, SamplingParams(max_new_tokens=12), 3)
    assert tokens == greedy_reference(target, prompt, 12)
    texts = set()
    # the paged engine, the static decoder, a draft tree, drafting while the head is confident
    for extra in ([], ["--static"], ["--tree-width", "3"], ["--draft-confidence", "0.4"]):
        run = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifact", str(tiny_artifact.path),
                              "--draft", str(out), "--prompt", "The river rose after the storm", "--max-tokens", "12",
                              "--k", "3", *extra], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-800:]
        assert "acceptance" in run.stdout and ("tree width 3" in run.stdout) == (extra[:1] == ["--tree-width"])
        texts.add(run.stdout.rsplit("[prefill", 1)[0].strip())
    assert texts == {tiny_tokenizer.decode(tokens, skip_special_tokens=True).strip()}
    # served: the same greedy text as the plain server, the head's proposals counted in /metrics
    import httpx

    from tests.runtime.server_helpers import running_server

    body = {"model": "m", "prompt": "The river rose after the storm", "max_tokens": 12, "temperature": 0}
    with running_server(str(tiny_artifact.path), model_name="m") as (url, _):
        plain = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
    with running_server(str(tiny_artifact.path), model_name="m", draft=str(out), k=3) as (url, server):
        served = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
        assert server.scheduler.stats.draft_proposed > 0
        assert "shrinkwrap_speculative_acceptance_rate" in httpx.get(f"{url}/metrics").text
    assert served == plain


def test_smoke_exit_head_shares_the_targets_layers_and_is_exact(tiny_artifact, tmp_path, tiny_tokenizer):
    """configs/draft/smoke-exit.yaml: an exit after the target's layer 1, stored alone; runtime.generate with it
    gives the plain greedy text, on the paged engine and on the static decoder."""
    from safetensors import safe_open

    from runtime.exit_head import is_exit_head, load_exit_head, self_speculative

    out = tmp_path / "exit"
    main(["--config", str(ROOT / "configs/draft/smoke-exit.yaml"), "--target", str(tiny_artifact.path),
          "--out", str(out)])
    draft = open_artifact(out)
    made = draft.manifest["draft"]
    assert is_exit_head(out) and made["exit_layer"] == 1 and made["target_content_hash"] == tiny_artifact.content_hash
    assert 0.0 <= draft.manifest["metrics"]["values"]["acceptance_rate"] <= 1.0
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the exit only: no layer of the target
        assert sorted(f.keys()) == ["down.weight", "gate_up.weight", "norm.weight"]
    target = load_artifact_model(tiny_artifact.path).eval()
    prompt = tiny_tokenizer("The river rose after the storm")["input_ids"]
    tokens, _ = self_speculative(Engine(target), load_exit_head(out, target), prompt, SamplingParams(max_new_tokens=12), 3)
    assert tokens == greedy_reference(target, prompt, 12)
    base = [sys.executable, "-m", "runtime.generate", "--artifact", str(tiny_artifact.path), "--prompt",
            "The river rose after the storm", "--max-tokens", "12"]
    plain = subprocess.run(base, capture_output=True, text=True, cwd=ROOT)
    run = subprocess.run([*base, "--draft", str(out), "--k", "3"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-800:]
    assert run.stdout.splitlines()[0] == plain.stdout.splitlines()[0] and "acceptance" in run.stdout
    static = subprocess.run([*base, "--draft", str(out), "--k", "2", "--static"], capture_output=True, text=True,
                            cwd=ROOT)  # the static decoder's exit cycle (PyTorch layers on the CPU)
    assert static.returncode == 0, static.stderr[-800:]
    assert static.stdout.splitlines()[0] == plain.stdout.splitlines()[0] and "acceptance" in static.stdout
    lossy = subprocess.run([*base, "--draft", str(out), "--early-exit-threshold", "0.001"], capture_output=True,
                           text=True, cwd=ROOT)
    assert lossy.returncode == 0 and "11 of 12 tokens exited, 0 target passes" in lossy.stdout, lossy.stderr[-500:]
    from compress.evaluate import EvaluateConfig, evaluate

    curve = evaluate(EvaluateConfig(reference=str(tiny_artifact.path), artifacts=[str(tiny_artifact.path)],
                                    out=str(tmp_path / "eval"), max_eval_tokens=256, seq_len=128, speed=False,
                                    early_exit=str(out), exit_thresholds=[1.0, 0.001]))["early_exit"]
    assert [row["exit_rate"] for row in curve["accuracy"]] == [0.0, 1.0]
    import httpx

    from tests.runtime.server_helpers import running_server
    from tests.runtime.test_serve import metric

    body = {"model": "tiny", "prompt": "The river rose after the storm", "max_tokens": 12, "temperature": 0}
    texts = []
    for draft in (None, str(out)):  # the served exit head: the plain server's greedy text
        with running_server(str(tiny_artifact.path), model_name="tiny", draft=draft, k=3) as (url, _):
            texts.append(httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"])
            if draft is not None:
                assert metric(url, "shrinkwrap_draft_calls_total") > 0
    assert texts[0] == texts[1]
