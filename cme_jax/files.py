"""The one reader of JSON records (JSONL, JSON lists, JSON column objects) and YAML mappings for every command."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cme_jax.errors import CmeError

log = logging.getLogger(__name__)
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


class JsonlCache:
    """Append-only JSONL map from a key (a hash) to a finished result: judge replies, scored rows, served scores.

    Loaded at start, written per entry. Each line is `{"key", "judge", "output"}` (`judge` names what produced
    the entry); inputs are not stored (the hash suffices). A torn last line from a crash mid-write is skipped.
    `path=None` keeps the cache in memory only.
    """

    def __init__(self, path: str | os.PathLike[str] | None):
        self.path = Path(path) if path is not None else None
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()
        self.skipped_lines = 0
        # A run killed mid-line leaves no final newline: the next append must start a fresh line.
        self._needs_newline = False
        if self.path is not None and self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as fb:
                fb.seek(-1, os.SEEK_END)
                self._needs_newline = fb.read(1) != b"\n"
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self._data[row["key"]] = row["output"]
                    except (ValueError, KeyError, TypeError):
                        self.skipped_lines += 1
            if self.skipped_lines:
                log.warning("cache %s: skipped %d unreadable lines", self.path, self.skipped_lines)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> str | None:
        """The cached reply for a key, or None."""
        return self._data.get(key)

    def put(self, key: str, judge_id: str, output: str) -> None:
        """Record a reply in memory and append it to the file at once, so a crash loses nothing."""
        with self._lock:
            if key in self._data:
                return
            self._data[key] = output
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "judge": judge_id, "output": output}, ensure_ascii=False)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(("\n" if self._needs_newline else "") + line + "\n")
                f.flush()
            self._needs_newline = False
