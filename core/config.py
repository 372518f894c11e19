"""Step configs: one dataclass per command; YAML keys and CLI flags carry the same names.

`--group-size 64` on the command line and `group_size: 64` in the YAML set the same field; flags
override the file. Unknown keys and wrong types fail before any work, naming the file and key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import UserError

C = TypeVar("C")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...] and return (type, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must not be empty")
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, where) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, dict | list):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if base is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"{path}{at}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def build_config(cls: type[C], values: dict[str, Any], source: str) -> C:
    """Make a config dataclass from a mapping; unknown keys and bad types name `source`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            raise UserError(f"{source}: unknown key '{raw_key}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(value, hints[key], f"{source}: {key}")
    try:
        cfg = cls(**kwargs)
    except TypeError as exc:
        raise UserError(f"{source}: {exc}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
    return cfg


def parse_config(cls: type[C], argv: Sequence[str] | None, prog: str, description: str) -> C:
    """Parse `--config FILE` plus flags into `cls`; flags override the file."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file whose keys mirror these flags")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if default is not None and default != [] and base is not bool:
            help_text += f" (default: {default})"
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text + f" (default: {default})")
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            convert = int if choices and all(isinstance(c, int) for c in choices) else None
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, type=convert,
                                choices=choices, metavar=f.metadata.get("metavar"))
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = read_yaml(config_path) if config_path else {}
    source = str(config_path) if config_path else "command line"
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update(args)
    cfg = build_config(cls, values, source)
    # refuse an existing output before the work, not after it (write_artifact checks again at the end)
    out, overwrite = getattr(cfg, "out", None), getattr(cfg, "overwrite", None)
    if overwrite is False and out and Path(out).exists() and not getattr(cfg, "if_missing", False):
        raise UserError(f"out: {out} already exists (pass --overwrite to replace it)")
    return cfg


def field(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:  # noqa: A002
    """A dataclass field with CLI help text (and optional `choices`)."""
    meta["help"] = help
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
