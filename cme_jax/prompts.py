"""Prompt sets for RL training: loading, cleaning, filtering, a held-out split and a checkpointable order.

A prompt source is one spec string:

- ``builtin:NAME``: a JSONL set shipped in the ``cme_jax.data`` package (``builtin:prompts``, 320 prompts).
- a local ``.jsonl``, ``.json`` (a list of objects, or an object of columns) or ``.parquet`` file; a
  directory written by ``datasets``' ``save_to_disk``; any other directory is read by ``load_dataset``.
- a Hugging Face Hub dataset id, ``owner/name`` or ``hf:owner/name``, read with
  ``datasets.load_dataset(name, split=...)``; ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` load
  it from the local cache only. ``name@split`` picks a split for that spec alone (handy for ``exclude``).

The prompt field is ``data.field``, else the first of ``prompt``, ``instruction``, ``messages`` that the
records have (``HuggingFaceH4/ultrafeedback_binarized``: ``prompt``; ``openbmb/UltraFeedback``:
``instruction``). A field holding a chat message list contributes its first user turn's content; later
turns are dropped, because the policy's chat template is applied to a single user prompt
(``cme_jax.tokens.format_prompt``). This module yields prompt texts, never formatted ones.

Prompts are cleaned (Unix newlines, no trailing spaces, at most one blank line in a row, trimmed) and
compared by a key that also collapses every whitespace run to one space: that key drives de-duplication,
the removal of prompts that appear in an evaluation set, and the held-out split, which puts a prompt in
the held-out set when a hash of its key falls below ``heldout_fraction``, the same on every run and host.

The training order is a permutation per epoch from (seed, epoch); epochs roll over inside a batch. The
global batch at a position is the same for any number of processes and process p takes the p-th
contiguous slice, so P processes together see exactly the one-process batch. ``PromptSampler`` is an
immutable position whose ``state_dict()`` goes into checkpoints.

Inspect a source from the command line (counts and the first prompts; no token-length filter):

    python -m cme_jax.prompts builtin:prompts --show 3
    python -m cme_jax.prompts HuggingFaceH4/ultrafeedback_binarized --split train_prefs --limit 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cme_jax.errors import CmeError, cli_main
from cme_jax.files import iter_json, iter_jsonl

AUTO_FIELDS = ("prompt", "instruction", "messages")
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# Suffixes that mark a spec as a file name even when the file is missing; a Hub id may contain a dot
# (``teknium/OpenHermes-2.5``), so only these decide "file", everything else falls through to the Hub.
_FILE_LIKE_SUFFIXES = {*FILE_KINDS, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".yaml", ".yml"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Versions the held-out hash so that a future change to it is a deliberate, visible one.
_HELDOUT_SALT = b"cme_jax-heldout-v1\0"

EncodeFn = Callable[[Sequence[str]], Sequence[Sequence[int]]]
SourceKind = Literal["builtin", "file", "disk", "hub"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where prompts come from and how they are cleaned, filtered and split."""

    source: str = "builtin:prompts"
    split: str = "train"  # Hub / dataset-directory split; a spec's own @split wins
    field: str | None = None  # None: the first of prompt, instruction, messages
    min_prompt_tokens: int = 1  # measured on the formatted prompt, only when a tokenizer is given
    max_prompt_tokens: int = 512
    dedup: bool = True
    heldout_fraction: float = 0.0
    exclude: str | None = None  # another source (e.g. an evaluation set) whose prompts are removed
    seed: int = 0
    limit: int | None = None  # read at most this many records from the source, before any filtering

    def __post_init__(self) -> None:
        """Validate every field, failing with one line that names the field and what is allowed."""
        for name in ("source", "split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"data.{name}={value!r} must be a non-empty string")
        for name in ("field", "exclude"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"data.{name}={value!r} must be a non-empty string or null")
        for name, low in (("min_prompt_tokens", 0), ("max_prompt_tokens", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name}={value!r} must be an integer >= {low}")
        if self.max_prompt_tokens < self.min_prompt_tokens:
            raise ValueError(
                f"data.max_prompt_tokens={self.max_prompt_tokens} must be >= "
                f"data.min_prompt_tokens={self.min_prompt_tokens}"
            )
        if not isinstance(self.dedup, bool):
            raise ValueError(f"data.dedup={self.dedup!r} must be true or false")
        hf = self.heldout_fraction
        if isinstance(hf, bool) or not isinstance(hf, int | float) or not 0.0 <= hf < 1.0:
            raise ValueError(f"data.heldout_fraction={hf!r} must be a number in [0, 1)")
        lim = self.limit
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
            raise ValueError(f"data.limit={lim!r} must be an integer >= 1 or null")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Cleaned training and held-out prompt texts, and counts of what was read and dropped."""

    train: list[str]
    heldout: list[str]
    stats: dict[str, int]

    @functools.cached_property
    def fingerprint(self) -> str:
        """Short hash of the training prompts in order; a checkpointed order is only valid for the same set."""
        return _digest(self.train)


# ---------------------------------------------------------------------------------------------------------
# Text cleaning


_BLANK_RUN = re.compile(r"\n{3,}")


def clean_prompt(text: str) -> str:
    """Prompt text as trained on: NFC, Unix newlines, no trailing spaces, at most one blank line, trimmed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    # Leading indentation inside the text is kept: it carries meaning in code and lists.
    return _BLANK_RUN.sub("\n\n", text).strip()


def prompt_key(text: str) -> str:
    """Comparison key of a prompt: its cleaned text with every whitespace run collapsed to one space."""
    return " ".join(clean_prompt(text).split())


def heldout_score(text: str) -> float:
    """Position of a prompt in [0, 1), from a hash of its key; below heldout_fraction means held out."""
    digest = hashlib.sha256(_HELDOUT_SALT + prompt_key(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _digest(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Reading sources


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def parse_source(spec: str) -> tuple[SourceKind, str, str | None]:
    """(kind, location, split or None) of a source spec; raises CmeError for a missing file."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        return "builtin", spec.removeprefix("builtin:"), None
    hub = spec.startswith("hf:")
    name = spec.removeprefix("hf:")
    split = None
    if "@" in name and not Path(name).exists():
        name, split = name.rsplit("@", 1)
        if not split:
            raise CmeError(f"prompt source {spec!r} has an empty split after '@'; write NAME@SPLIT")
    if hub:
        return "hub", name, split
    path = Path(name).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
        return ("disk" if saved else "hub"), str(path), split
    if path.exists():
        return "file", str(path), split
    if path.suffix.lower() in _FILE_LIKE_SUFFIXES or name.startswith(("/", "./", "../", "~")):
        raise CmeError(f"prompt file {name} does not exist; give an existing .jsonl, .json or .parquet file")
    if _HUB_ID.match(name):
        return "hub", name, split
    raise CmeError(
        f"prompt source {spec!r} is not a file, a builtin:NAME set or a Hub dataset id (owner/name); fix the path"
    )


def builtin_names() -> list[str]:
    """Names of the prompt sets shipped in cme_jax.data (use as builtin:NAME)."""
    return sorted(
        p.name.removesuffix(".jsonl") for p in resources.files("cme_jax.data").iterdir() if p.name.endswith(".jsonl")
    )


def _pick_field(columns: Sequence[str], field: str | None, where: str) -> str:
    if field is not None:
        if field not in columns:
            raise CmeError(f"{where} has no field {field!r} (it has {', '.join(columns) or 'none'}); fix data.field")
        return field
    for name in AUTO_FIELDS:
        if name in columns:
            return name
    raise CmeError(
        f"{where} has no prompt, instruction or messages field (it has {', '.join(columns) or 'none'}); "
        "set data.field to the prompt column"
    )


def _text_of(value: Any, where: str, field: str) -> str:
    """The prompt text of one field value: a string, or the first user turn of a chat message list."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list | tuple):
        for m in value:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise CmeError(f"{where}: field {field!r} is a list but not chat messages with role and content")
            if m["role"] == "user":
                content = m["content"]
                if isinstance(content, list):  # content parts: keep the text ones
                    content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
                return content if isinstance(content, str) else ""
        return ""  # no user turn: counted as empty
    raise CmeError(f"{where}: field {field!r} is {type(value).__name__}; expected text or a chat message list")


def _records_texts(records: Iterable[tuple[str, dict[str, Any]]], field: str | None, where: str, limit: int | None):
    texts: list[str] = []
    chosen = None
    for label, row in records:
        if limit is not None and len(texts) >= limit:
            break
        if chosen is None:
            chosen = _pick_field(list(row), field, where)
        if chosen not in row:
            raise CmeError(
                f"{label} has no {chosen!r} field (it has {', '.join(row) or 'none'}); every record needs one"
            )
        texts.append(_text_of(row[chosen], label, chosen))
    if chosen is None:
        raise CmeError(f"{where} holds no records; give a file with one prompt per record")
    return texts


def _columns_texts(columns: Sequence[str], get_column: Callable[[str], Iterable[Any]], field, where, n_rows):
    if n_rows == 0:
        raise CmeError(f"{where} holds no records; give a dataset with at least one prompt")
    chosen = _pick_field(columns, field, where)
    return [_text_of(v, f"{where}: row {i}", chosen) for i, v in enumerate(get_column(chosen))]


def _read_file(path: Path, field: str | None, limit: int | None) -> list[str]:
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise CmeError(f"prompt file {path} has unknown type {path.suffix!r}; use .jsonl, .json or .parquet")
    if kind == "jsonl":
        with path.open(encoding="utf-8-sig") as f:
            return _records_texts(iter_jsonl(f, str(path)), field, str(path), limit)
    if kind == "json":
        return _records_texts(iter_json(path), field, str(path), limit)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise CmeError(f"{path} is not a readable parquet file ({_first_line(e)})") from None
    if limit is not None:
        table = table.slice(0, limit)
    return _columns_texts(table.column_names, lambda c: table.column(c).to_pylist(), field, str(path), table.num_rows)


def _dataset_texts(ds: Any, field: str | None, where: str) -> list[str]:
    return _columns_texts(list(ds.column_names), lambda c: ds[c], field, where, len(ds))


def _read_hub(name: str, split: str, field: str | None, limit: int | None) -> list[str]:
    import datasets

    where = f"dataset {name!r} split {split!r}"
    split_expr = f"{split}[:{limit}]" if limit is not None else split
    try:
        ds = datasets.load_dataset(name, split=split_expr)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, its own types...
        hint = "check the name and split"
        if datasets.config.HF_HUB_OFFLINE:
            hint = "HF offline mode is on: fetch it once online, or use a local .jsonl/.json/.parquet file"
        raise CmeError(f"cannot load {where}: {_first_line(e)}; {hint}") from None
    return _dataset_texts(ds, field, where)


def _read_disk(path: str, split: str, field: str | None, limit: int | None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise CmeError(f"cannot load saved dataset {path}: {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CmeError(f"saved dataset {path} has no split {split!r} (it has {', '.join(ds)}); fix data.split")
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _dataset_texts(ds, field, f"saved dataset {path}")


def read_prompt_texts(spec: str, split: str = "train", field: str | None = None, limit: int | None = None) -> list[str]:
    """Raw prompt texts of a source in its own order (not cleaned or filtered); CmeError on any problem."""
    kind, location, own_split = parse_source(spec)
    split = own_split or split
    if kind == "builtin":
        names = builtin_names()
        if location not in names:
            raise CmeError(
                f"unknown prompt set builtin:{location}; available: {', '.join(f'builtin:{n}' for n in names)}"
            )
        where = f"builtin:{location}"
        with resources.files("cme_jax.data").joinpath(f"{location}.jsonl").open("r", encoding="utf-8") as f:
            return _records_texts(iter_jsonl(f, where), field, where, limit)
    if kind == "file":
        return _read_file(Path(location), field, limit)
    if kind == "disk":
        return _read_disk(location, split, field, limit)
    return _read_hub(location, split, field, limit)


# ---------------------------------------------------------------------------------------------------------
# The prompt set


def load_prompts(cfg: DataConfig, tokenizer: Any = None, encode_fn: EncodeFn | None = None) -> PromptSet:
    """Read, clean, de-duplicate, exclude, length-filter and split the prompts of cfg.source.

    The token length is that of the formatted prompt exactly as the policy sees it: ``encode_fn(prompts)``
    (default ``cme_jax.tokens.encode_prompts(tokenizer, prompts)``, i.e. the chat template when there is
    one); without a tokenizer or encode_fn no length filter runs.
    """
    raw = read_prompt_texts(cfg.source, cfg.split, cfg.field, cfg.limit)
    stats = dict.fromkeys(("read", "empty", "duplicates", "excluded", "too_short", "too_long", "heldout", "train"), 0)
    stats["read"] = len(raw)
    excluded_keys: set[str] = set()
    if cfg.exclude is not None:
        excluded_keys = {prompt_key(t) for t in read_prompt_texts(cfg.exclude, cfg.split)} - {""}
    seen: set[str] = set()
    kept: list[str] = []
    for text in raw:
        text = clean_prompt(text)
        if not text:
            stats["empty"] += 1
            continue
        key = prompt_key(text)
        if cfg.dedup:
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
        if key in excluded_keys:
            stats["excluded"] += 1
            continue
        kept.append(text)
    if encode_fn is None and tokenizer is not None:
        from cme_jax.tokens import encode_prompts

        encode_fn = functools.partial(encode_prompts, tokenizer)
    if encode_fn is not None and kept:
        lengths = [len(ids) for ids in encode_fn(kept)]
        filtered = []
        for text, n in zip(kept, lengths, strict=True):
            if n < cfg.min_prompt_tokens:
                stats["too_short"] += 1
            elif n > cfg.max_prompt_tokens:
                stats["too_long"] += 1
            else:
                filtered.append(text)
        kept = filtered
    train, heldout = [], []
    for text in kept:
        (heldout if heldout_score(text) < cfg.heldout_fraction else train).append(text)
    stats["train"], stats["heldout"] = len(train), len(heldout)
    if not train:
        summary = ", ".join(f"{k}={v}" for k, v in stats.items())
        raise CmeError(
            f"no training prompts left from {cfg.source} ({summary}); "
            "loosen the token limits, exclude or heldout_fraction"
        )
    return PromptSet(train=train, heldout=heldout, stats=stats)


# ---------------------------------------------------------------------------------------------------------
# Order


@functools.lru_cache(maxsize=8)
def epoch_order(num_prompts: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of range(num_prompts) for one epoch, a pure function of (seed, epoch) (read-only array).

    Built from the raw PCG64 stream of SeedSequence([seed, epoch]) and a stable argsort, both of which numpy
    keeps fixed across versions (Generator.permutation may change), so resumed runs see the same order.
    """
    keys = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(num_prompts)
    order = np.argsort(keys, kind="stable").astype(np.int64)
    order.flags.writeable = False
    return order


@dataclasses.dataclass(frozen=True)
class PromptSampler:
    """A position in the endless prompt order; batches return the indices and the next position."""

    num_prompts: int
    seed: int = 0
    epoch: int = 0
    offset: int = 0  # prompts of this epoch's order already used
    fingerprint: str = ""  # PromptSet.fingerprint, checked when resuming

    def __post_init__(self) -> None:
        """Check the position is inside an epoch."""
        if self.num_prompts < 1:
            raise CmeError("the prompt order needs at least one prompt")
        if self.seed < 0 or self.epoch < 0 or not 0 <= self.offset < self.num_prompts:
            raise CmeError(
                f"invalid prompt position seed={self.seed} epoch={self.epoch} offset={self.offset} "
                f"for {self.num_prompts} prompts"
            )

    def global_batch(self, batch_size: int) -> tuple[np.ndarray, PromptSampler]:
        """Indices [batch_size] of the next global batch (all processes), rolling into later epochs."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise CmeError(f"prompt batch size must be an integer >= 1, got {batch_size!r}")
        parts = []
        epoch, offset, need = self.epoch, self.offset, int(batch_size)
        while need:
            take = min(need, self.num_prompts - offset)
            parts.append(epoch_order(self.num_prompts, self.seed, epoch)[offset : offset + take])
            need -= take
            offset += take
            if offset == self.num_prompts:
                epoch, offset = epoch + 1, 0
        return np.concatenate(parts), dataclasses.replace(self, epoch=epoch, offset=offset)

    def batch_for_process(
        self, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> tuple[np.ndarray, PromptSampler]:
        """This process's contiguous slice of the global batch, and the position after the whole global batch."""
        if not 0 <= process_index < process_count:
            raise CmeError(f"process_index {process_index} is outside 0..{process_count - 1}")
        if batch_size % process_count:
            raise CmeError(
                f"prompt batch size {batch_size} does not split over {process_count} processes; "
                f"use a multiple of {process_count}"
            )
        indices, after = self.global_batch(batch_size)
        share = batch_size // process_count
        return indices[process_index * share : (process_index + 1) * share], after

    def state_dict(self) -> dict[str, int | str]:
        """JSON-serialisable position for checkpoints."""
        return {
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "epoch": self.epoch,
            "offset": self.offset,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], num_prompts: int, fingerprint: str = "") -> PromptSampler:
        """The saved position, after checking it was saved for the same prompt set."""
        try:
            saved_n, seed, epoch, offset = (int(state[k]) for k in ("num_prompts", "seed", "epoch", "offset"))
        except (KeyError, TypeError, ValueError):
            raise CmeError(f"checkpoint prompt state {state!r} lacks num_prompts/seed/epoch/offset") from None
        saved_fp = str(state.get("fingerprint", ""))
        if saved_n != num_prompts or (saved_fp and fingerprint and saved_fp != fingerprint):
            raise CmeError(
                f"checkpoint order was saved for {saved_n} prompts (fingerprint {saved_fp or '?'}) but the prompt "
                f"set now has {num_prompts} ({fingerprint or '?'}); resume with the same data config"
            )
        return cls(num_prompts=num_prompts, seed=seed, epoch=epoch, offset=offset, fingerprint=fingerprint or saved_fp)


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.prompts", description=__doc__.split("\n")[0])
    p.add_argument("source", help="builtin:NAME, a .jsonl/.json/.parquet file, a dataset directory or a Hub id")
    p.add_argument("--split", default="train")
    p.add_argument("--field", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--exclude", default=None, help="source whose prompts are removed")
    p.add_argument("--heldout-fraction", type=float, default=0.0)
    p.add_argument("--no-dedup", action="store_true")
    p.add_argument("--show", type=int, default=0, help="print this many training prompts")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        cfg = DataConfig(
            source=args.source,
            split=args.split,
            field=args.field,
            limit=args.limit,
            exclude=args.exclude,
            heldout_fraction=args.heldout_fraction,
            dedup=not args.no_dedup,
        )
    except ValueError as e:
        raise CmeError(str(e)) from None
    ps = load_prompts(cfg)
    print(json.dumps({**ps.stats, "fingerprint": ps.fingerprint}))
    for text in ps.train[: args.show]:
        print(json.dumps(text, ensure_ascii=False))


if __name__ == "__main__":
    main()
