"""Typed configuration machinery: nested frozen dataclasses <- YAML mappings and `key.sub=value` overrides.

Every check here produces one line that names the key and what is allowed; the schema itself lives in
`cme_jax.config` as dataclasses, the only source of truth for options and defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from cme_jax.errors import CmeError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(options))}"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (coercing ints to floats and lists to tuples)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise CmeError(f"{where}={value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise CmeError(f"{where} must not be null; expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except CmeError as e:
                errors.append(str(e))
        raise CmeError(errors[0] if len(errors) == 1 else f"{where}={value!r} should be {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise CmeError(f"{where} should be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise CmeError(f"{where} should be a list, got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise CmeError(f"{where} should be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise CmeError(f"{where} should be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CmeError(f"{where} should be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (3e-4) as strings.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CmeError(f"{where} should be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CmeError(f"{where} should be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise CmeError(f"{where} should be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys, wrong types and invalid values fail in one line."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise CmeError(f"unknown config key {path!r}{_suggest(str(key), list(fields))}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CmeError(f"{where or cls.__name__}: {msg}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data for a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CmeError(f"override {text!r} should look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each `key.sub=value` inside a nested dict (list items are addressed by index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise CmeError(f"override {text!r}: {'.'.join(path[: i + 1])} is not an index of that list")
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise CmeError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise CmeError(f"override {text!r}: {last} is not an index of that list")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with one-line errors for missing files and bad syntax."""
    p = Path(path)
    if not p.exists():
        raise CmeError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise CmeError(f"config file {p} is not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CmeError(f"config file {p} should hold a mapping of sections, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file <- overrides, validated into `cls`."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def parse_size(text: str | int, where: str = "size") -> int:
    """Bytes in `80GB` (powers of 10), `16GiB` (powers of 2) or a plain number of bytes; one-line error otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text).lower())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise CmeError(f"{where}={text!r} is not a memory size; write it like 80GB, 16GiB or 512MiB")
        value, unit = float(m.group(1)), m.group(2)
    size = int(value * _SIZE_UNITS[unit])
    if size <= 0:
        raise CmeError(f"{where}={text!r} must be more than 0 bytes")
    return size


__all__ = [
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "load",
    "parse_override",
    "parse_size",
    "read_yaml",
    "to_dict",
]

# typing is imported for users that build schemas with typing.Optional; keep the name referenced.
_ = typing
