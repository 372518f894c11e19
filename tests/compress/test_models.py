import pytest
import torch

from compress.models import count_parameters, load_artifact_model, load_source_model
from core.errors import UserError


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="model not found"):
        load_source_model(str(tmp_path / "nope.gguf"))


def test_corrupt_gguf_names_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(UserError, match=r"broken\.gguf: cannot read this GGUF file"):
        load_source_model(str(bad))
    bad.write_bytes(b"NOPE" * 16)
    with pytest.raises(UserError, match=r"broken\.gguf: not a GGUF file"):
        load_source_model(str(bad))


def test_folder_without_config_and_wrong_suffix(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_source_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="expected a .gguf file"):
        load_source_model(str(tmp_path / "w.bin"))


def test_corrupt_weights_in_hf_folder(tiny_artifact):
    (tiny_artifact.path / "model.safetensors").write_bytes(b"\x00" * 32)
    with pytest.raises(UserError, match="cannot load this model"):
        load_source_model(str(tiny_artifact.path))


def test_hf_folder_roundtrip_and_parameter_count(tiny_artifact):
    model, tokenizer, _ = load_source_model(str(tiny_artifact.path))
    again = load_artifact_model(tiny_artifact.path)
    ids = torch.tensor([tokenizer("Hello world")["input_ids"]])
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values()) == tiny_artifact.manifest["model"]["parameters"]
