import csv
import shutil
import subprocess
import sys

import pytest
import torch

from compress.distill import DistillConfig, distill, evenly_spaced_layers
from compress.models import load_artifact_model
from compress.surgery import keep_layers
from core.config import build_config
from core.errors import UserError
from tests.conftest import make_tiny_llama


def _cfg(tiny_artifact, tmp_path, **kw):
    values = dict(teacher=str(tiny_artifact.path), out=str(tmp_path / "student"), init="config",
                  student_config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16},
                  seq_len=32, batch_size=4, max_steps=20, warmup_steps=2, lr=3e-3, val_every=10, val_windows=1,
                  eval_windows=1, ckpt_every=5, accelerator="cpu")
    values.update(kw)
    return build_config(DistillConfig, values, "test")


def _logged(work_dir, key):
    rows = []
    for path in sorted(work_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            rows += [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]
    return dict(rows)


def test_kd_loss_falls_and_artifact_is_written(tiny_artifact, tmp_path):
    art = distill(_cfg(tiny_artifact, tmp_path))
    losses = _logged(tmp_path / "student.work", "train/kd")
    first, last = [losses[s] for s in sorted(losses)[:3]], [losses[s] for s in sorted(losses)[-3:]]
    assert sum(last) / 3 < 0.8 * sum(first) / 3, losses
    d = art.manifest["distillation"]
    assert art.kind == "distilled" and art.manifest["parent"]["content_hash"] == tiny_artifact.content_hash
    assert d["steps"] == 20 and d["after"]["kl"] < d["before"]["kl"]
    model = load_artifact_model(art.path)
    assert model.config.num_hidden_layers == 1 and model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 512


def test_resume_reproduces_the_next_step(tiny_artifact, tmp_path):
    cfg = _cfg(tiny_artifact, tmp_path, max_steps=8, ckpt_every=4, val_every=100)
    distill(cfg)
    full = _logged(cfg.work_path, "train/loss")
    resumed_dir = tmp_path / "resumed.work"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(cfg.work_path / "checkpoints" / "step4.ckpt", resumed_dir / "checkpoints" / "last.ckpt")
    cfg2 = _cfg(tiny_artifact, tmp_path, max_steps=8, ckpt_every=4, val_every=100, out=str(tmp_path / "s2"),
                work_dir=str(resumed_dir), resume=True)
    distill(cfg2)
    again = _logged(resumed_dir, "train/loss")
    assert min(again) == 4  # the resumed run starts at step 5 (logged as index 4)
    for step in (4, 5):
        assert again[step] == pytest.approx(full[step], rel=1e-5), (step, full, again)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_llama(seed=3).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_layer_drop_copies_the_chosen_layers():
    teacher = make_tiny_llama(layers=4)
    student = keep_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert evenly_spaced_layers(30, 15)[0] == 0 and evenly_spaced_layers(30, 15)[-1] == 29
    assert len(evenly_spaced_layers(30, 15)) == 15


def test_bad_configs_fail_before_training(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="student_layers: the student must be smaller"):
        distill(_cfg(tiny_artifact, tmp_path, init="layer-drop", student_layers=2))
    with pytest.raises(UserError, match="not smaller than the teacher"):
        distill(_cfg(tiny_artifact, tmp_path, student_config={"hidden_size": 128, "intermediate_size": 256,
                                                               "head_dim": 32}))
    with pytest.raises(UserError, match="vocab_size 1000 differs"):
        distill(_cfg(tiny_artifact, tmp_path, student_config={"vocab_size": 1000}))
    other = tmp_path / "other-tok"
    shutil.copytree(tiny_artifact.path, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace("<|im_end|>", "<|end|>"))
    with pytest.raises(UserError, match="does not use the teacher's tokenizer"):
        distill(_cfg(tiny_artifact, tmp_path, init="artifact", student=str(other)))
    assert not (tmp_path / "student").exists() and not (tmp_path / "student.work").exists()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("teacher: x\nlearning_rate: 1\n")
    proc = subprocess.run([sys.executable, "-m", "compress.distill", "--config", str(bad_yaml)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "bad.yaml: unknown key 'learning_rate'" in proc.stderr


def test_kill_9_leaves_no_artifact_and_resume_finishes(tiny_artifact, tmp_path):
    import signal
    import time

    args = [sys.executable, "-m", "compress.distill", "--teacher", str(tiny_artifact.path), "--out",
            str(tmp_path / "k"), "--init", "layer-drop", "--student-layers", "1", "--seq-len", "32",
            "--batch-size", "2", "--max-steps", "300", "--ckpt-every", "5", "--val-every", "1000",
            "--val-windows", "1", "--eval-windows", "1", "--accelerator", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "k.work" / "checkpoints" / "step10.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "k").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".k")]
    done = subprocess.run(args + ["--resume", "--max-steps", "20"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from compress.artifact import open_artifact

    assert open_artifact(tmp_path / "k").manifest["distillation"]["steps"] == 20


def test_all_losses_and_sequence_kd(tiny_artifact, tmp_path):
    cfg = _cfg(tiny_artifact, tmp_path, init="layer-drop", student_layers=1, max_steps=4, reverse_kd_weight=0.5,
               ce_weight=0.2, hidden_weight=0.5, temperature=2.0, seq_kd=True, seq_kd_samples=2, seq_kd_tokens=16,
               seq_kd_batch=64)
    art = distill(cfg)
    losses = _logged(cfg.work_path, "train/hidden")
    assert losses and all(v >= 0 for v in losses.values())
    assert _logged(cfg.work_path, "train/reverse_kd") and _logged(cfg.work_path, "train/ce")
    caches = list(cfg.work_path.glob("seqkd-*.pt"))
    assert len(caches) == 1
    sequences = torch.load(caches[0], weights_only=True)
    assert sequences.shape[1] == 32 and sequences.shape[0] % 2 == 0
    assert art.manifest["distillation"]["steps"] == 4
