"""EleutherAI's lm-evaluation-harness as a client: its `local-completions` model against our server
scores the same as its own `hf` model on the same artifact (two small tasks shipped as local JSONL)."""

from pathlib import Path

import pytest

from tests.runtime.server_helpers import running_server

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "lm_eval_tasks"


def write_tasks(folder: Path) -> None:
    """Task YAMLs pointing at the shipped JSONL files (data_files paths must be absolute)."""
    (folder / "mc.yaml").write_text(f"""task: shrinkwrap_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASKS / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: shrinkwrap_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASKS / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 24
  do_sample: false
filter_list:
  - name: last_word
    filter:
      - function: regex
        regex_pattern: '(\\w+)\\W*$'
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""")


def evaluate(model: str, model_args: str, include: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=["shrinkwrap_mc", "shrinkwrap_gen"],
                           task_manager=TaskManager(include_path=str(include)), log_samples=True,
                           bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def test_local_completions_against_our_server_equals_lm_eval_hf(reference_artifact, tmp_path):
    write_tasks(tmp_path)
    path = str(reference_artifact.path)
    hf = evaluate("hf", f"pretrained={path},dtype=float32,device=cpu,batch_size=4", tmp_path)
    with running_server(path, model_name="smollm2") as (url, _):
        ours = evaluate("local-completions", f"model=smollm2,base_url={url}/v1/completions,tokenizer={path},"
                        "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1", tmp_path)
    print({name: r["results"] for name, r in (("hf", hf), ("ours", ours))})  # shown with pytest -s
    assert ours["results"]["shrinkwrap_mc"]["acc,none"] == hf["results"]["shrinkwrap_mc"]["acc,none"]
    assert hf["results"]["shrinkwrap_mc"]["acc,none"] >= 0.5  # the real model knows most of these
    # loglikelihoods per choice: same to fp32 rounding (ours: paged batches; lm-eval: padded batches)
    for a, b in zip(hf["samples"]["shrinkwrap_mc"], ours["samples"]["shrinkwrap_mc"], strict=True):
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=2e-3)
    # greedy generation: the same text for every prompt, so the same exact-match score
    hf_text = [s["resps"][0][0] for s in hf["samples"]["shrinkwrap_gen"]]
    our_text = [s["resps"][0][0] for s in ours["samples"]["shrinkwrap_gen"]]
    assert our_text == hf_text and any(t.strip() for t in hf_text)
    score = hf["results"]["shrinkwrap_gen"]["exact_match,last_word"]
    assert ours["results"]["shrinkwrap_gen"]["exact_match,last_word"] == score > 0
