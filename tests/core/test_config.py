from dataclasses import dataclass

import pytest

from core.config import field, parse_config
from core.errors import UserError


@dataclass
class DemoConfig:
    bits: int = field(4, help="bits")
    group_size: int = field(128, help="group")
    desc_act: bool = field(False, help="act order")
    name: str | None = field(None, help="name")
    items: list[str] = field([], help="items")
    level: int = field(4, help="level", choices=(0, 1, 4))

    def validate(self):
        if self.bits not in (4, 8):
            raise UserError(f"bits: must be 4 or 8, got {self.bits}")


def test_flags_override_yaml(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("bits: 8\ngroup-size: 64\ndesc_act: true\n")
    cfg = parse_config(DemoConfig, ["--config", str(cfg_file), "--group-size", "32"], "demo", "")
    assert (cfg.bits, cfg.group_size, cfg.desc_act) == (8, 32, True)


def test_list_flag_and_negated_bool():
    cfg = parse_config(DemoConfig, ["--items", "a", "b", "--no-desc-act"], "demo", "")
    assert cfg.items == ["a", "b"] and cfg.desc_act is False


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("bitz: 8\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown key 'bitz'"):
        parse_config(DemoConfig, ["--config", str(cfg_file)], "demo", "")


def test_wrong_type_names_key(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("group_size: [1, 2]\n")
    with pytest.raises(UserError, match="group_size: expected an integer"):
        parse_config(DemoConfig, ["--config", str(cfg_file)], "demo", "")


def test_validate_runs_and_names_source():
    with pytest.raises(UserError, match="command line: bits: must be 4 or 8"):
        parse_config(DemoConfig, ["--bits", "3"], "demo", "")


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        parse_config(DemoConfig, ["--config", str(tmp_path / "nope.yaml")], "demo", "")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bits: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*not valid YAML"):
        parse_config(DemoConfig, ["--config", str(bad)], "demo", "")


def test_integer_choices_from_the_command_line():
    assert parse_config(DemoConfig, ["--level", "1"], "demo", "").level == 1
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--level", "3"], "demo", "")


@dataclass
class _Writes:
    out: str = field(None)
    overwrite: bool = field(False)


def test_existing_output_is_refused_before_the_work(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists .*--overwrite"):
        parse_config(_Writes, ["--out", str(tmp_path / "taken")], "p", "d")
    assert parse_config(_Writes, ["--out", str(tmp_path / "taken"), "--overwrite"], "p", "d").overwrite
    assert parse_config(_Writes, ["--out", str(tmp_path / "free")], "p", "d").out.endswith("free")
