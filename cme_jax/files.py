"""The one reader of JSON records (JSONL, JSON lists, JSON column objects) and YAML mappings for every command."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cme_jax.errors import CmeError

Record = tuple[str, dict[str, Any]]  # (position label "file:line" or "file: record i", the object)


def iter_jsonl(lines: Iterable[str], where: str, *, skip_bad: bool = False) -> Iterator[Record]:
    """(position, object) for each non-blank line; a bad line is one CmeError naming it, or skipped with
    `skip_bad` (a run's own log, whose last line a killed write may have cut short)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_bad:
                continue
            raise CmeError(f"{where}:{n} is not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            if skip_bad:
                continue
            raise CmeError(f"{where}:{n} is a JSON {type(row).__name__}, not an object")
        yield f"{where}:{n}", row


def iter_json(path: Path) -> Iterator[Record]:
    """The objects of a .json file: a list of objects, an object of equal-length columns, or one object a line."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name, as `datasets` also accepts
            yield from iter_jsonl(text.splitlines(), str(path))
            return
        raise CmeError(f"{path}:{e.lineno} is not valid JSON ({e.msg})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise CmeError(f"{path} holds columns of different lengths; give a list of objects instead")
        data = [dict(zip(data, row)) for row in zip(*data.values())]
    if not isinstance(data, list):
        raise CmeError(f"{path} must hold a list of objects (or an object of equal-length columns)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise CmeError(f"{path}: record {i} is a JSON {type(row).__name__}, not an object")
        yield f"{path}: record {i}", row


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); one-line CmeError when missing or not text."""
    path = Path(path)
    if not path.is_file():
        raise CmeError(f"cannot read {what} {path}: it does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CmeError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise CmeError(f"cannot read {what} {path}: {e.strerror}") from None


def read_records(path: str | Path, what: str = "file") -> list[Record]:
    """Every object of a .jsonl file (one a line) or a .json file (see `iter_json`), with its position."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        read_text(path, what)  # the missing-file message names what the file is for
        return list(iter_json(path))
    return list(iter_jsonl(read_text(path, what).splitlines(), str(path)))


def read_run_log(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's own JSONL file ([] without one); a line cut short by a killed write is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    return [row for _, row in iter_jsonl(path.read_text(encoding="utf-8").splitlines(), str(path), skip_bad=True)]


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping; one-line CmeError when missing, invalid or not a mapping."""
    import yaml

    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CmeError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CmeError(f"{path} must hold a YAML mapping, not {type(data).__name__}")
    return data
