"""Prompt sets: reading every source kind, cleaning, filters, held-out split, order, resume and process shares."""

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_hf import tiny_tokenizer

from cme_jax.errors import CmeError
from cme_jax.prompts import (
    DataConfig,
    PromptSampler,
    clean_prompt,
    epoch_order,
    heldout_score,
    load_prompts,
    main,
    prompt_key,
    read_prompt_texts,
)
from cme_jax.tokens import encode_prompts
from tests.helpers import cli_error

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CmeError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- cleaning, de-duplication, exclusion -----------------------------------------------------------------


def test_clean_prompt_and_key():
    raw = "\r\n  Title:  \r\n\r\n\r\n\r\n    indented code  \t\nlast line\u00a0 \n\n"
    assert clean_prompt(raw) == "Title:\n\n    indented code\nlast line"
    assert prompt_key(raw) == "Title: indented code last line"
    # NFC: a decomposed accent compares equal to the composed one.
    assert clean_prompt("cafe\u0301") == "caf\u00e9"
    assert prompt_key("a\tb\n\nc") == prompt_key(" a b c ")


def test_dedup_and_empty_counts(tmp_path):
    rows = [
        {"prompt": "What is 2+2?"},
        {"prompt": "  What is\t2+2?\n"},  # whitespace variant of the first
        {"prompt": "   \n "},  # empty after cleaning
        {"prompt": None},
        {"prompt": "Name a colour."},
        {"prompt": "What is 2+2?"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ps = load_prompts(DataConfig(source=str(path)))
    assert ps.train == ["What is 2+2?", "Name a colour."]
    assert ps.heldout == []
    assert ps.stats == dict(read=6, empty=2, duplicates=2, excluded=0, too_short=0, too_long=0, heldout=0, train=2)
    kept = load_prompts(DataConfig(source=str(path), dedup=False))
    assert kept.train == ["What is 2+2?", "What is\t2+2?", "Name a colour.", "What is 2+2?"]
    assert kept.stats["duplicates"] == 0


def test_exclusion_compares_normalised_text(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Question number {i}?"} for i in range(10)])
    # The evaluation set has its own field name and different whitespace.
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Question  number 3?\n"}, {"instruction": "Q 7"}])
    evals2 = tmp_path / "eval.json"
    evals2.write_text(json.dumps([{"prompt": "Question number\n5?"}]))
    ps = load_prompts(DataConfig(source=str(train), exclude=str(evals)))
    assert ps.train == [f"Question number {i}?" for i in range(10) if i != 3]
    assert ps.stats["excluded"] == 1
    ps = load_prompts(DataConfig(source=str(train), exclude=str(evals2)))
    assert "Question number 5?" not in ps.train and ps.stats["excluded"] == 1


def test_limit_reads_first_records(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    ps = load_prompts(DataConfig(source=str(path), limit=4))
    assert ps.train == ["p0", "p1", "p2", "p3"] and ps.stats["read"] == 4


# --- token-length filter ---------------------------------------------------------------------------------


def test_length_filter_on_formatted_prompt(tmp_path):
    tok = tiny_tokenizer()
    texts = ["hello", "hello world", "the quick brown fox jumps over the lazy dog", "one two three " * 6]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    # Reference lengths from transformers' own chat template rendering (token ids of the whole context).
    chat_len = {
        t.strip(): len(
            tok.apply_chat_template([{"role": "user", "content": t.strip()}], add_generation_prompt=True)["input_ids"]
        )
        for t in texts
    }
    lo, hi = sorted(chat_len.values())[1], sorted(chat_len.values())[2]
    ps = load_prompts(DataConfig(source=str(path), min_prompt_tokens=lo, max_prompt_tokens=hi), tokenizer=tok)
    assert ps.train == [t.strip() for t in texts if lo <= chat_len[t.strip()] <= hi]
    assert len(ps.train) == 2
    assert ps.stats["too_short"] == 1 and ps.stats["too_long"] == 1
    # The template adds tokens: the plain length of the same prompt is smaller than its chat length.
    plain_len = {t.strip(): len(tok(t.strip() + "\n")["input_ids"]) for t in texts}
    assert all(plain_len[t] < chat_len[t] for t in chat_len)
    plain = functools.partial(encode_prompts, tok, fmt="plain")
    cfg = DataConfig(source=str(path), min_prompt_tokens=0, max_prompt_tokens=sorted(plain_len.values())[1])
    ps = load_prompts(cfg, encode_fn=plain)
    assert ps.train == [t.strip() for t in texts if plain_len[t.strip()] <= cfg.max_prompt_tokens]


def test_nothing_left_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world"}])
    msg = one_line_error(load_prompts, DataConfig(source=str(path), max_prompt_tokens=2), tiny_tokenizer())
    assert "no training prompts left" in msg and "too_long=1" in msg


# --- held-out split --------------------------------------------------------------------------------------


def test_heldout_score_is_the_documented_hash():
    expect = int.from_bytes(hashlib.sha256(b"cme_jax-heldout-v1\0Why is the sky blue?").digest()[:8], "big") / 2**64
    assert heldout_score("Why is the sky blue?") == expect
    assert heldout_score("  Why is the\nsky blue? ") == expect


def test_heldout_split_deterministic_disjoint_and_order_free(tmp_path):
    full = load_prompts(DataConfig())
    ps = load_prompts(DataConfig(heldout_fraction=0.25))
    assert set(ps.train).isdisjoint(ps.heldout)
    assert sorted(ps.train + ps.heldout) == sorted(full.train)
    assert 0.15 < len(ps.heldout) / len(full.train) < 0.35
    assert load_prompts(DataConfig(heldout_fraction=0.25, seed=7)) == ps  # the seed moves the order, not the split
    # Same prompts in another order and with other whitespace: the same held-out set.
    rng = np.random.default_rng(0)
    shuffled = [full.train[i].replace(" ", "  ") + "\n" for i in rng.permutation(len(full.train))]
    path = write_jsonl(tmp_path / "shuffled.jsonl", [{"prompt": t} for t in shuffled])
    other = load_prompts(DataConfig(source=str(path), heldout_fraction=0.25))
    assert {prompt_key(t) for t in other.heldout} == {prompt_key(t) for t in ps.heldout}
    # A larger fraction only adds prompts to the held-out set.
    assert set(ps.heldout) <= set(load_prompts(DataConfig(heldout_fraction=0.5)).heldout)


# --- order, resume, process shares -----------------------------------------------------------------------


def test_epoch_order_pinned_and_deterministic():
    # Pinned: a change here reorders every resumed run.
    assert epoch_order(10, 0, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert epoch_order(10, 0, 1).tolist() == [7, 4, 5, 1, 9, 8, 6, 2, 0, 3]
    assert epoch_order(10, 1, 0).tolist() == [9, 2, 4, 7, 5, 0, 8, 6, 3, 1]
    a = epoch_order(1000, 3, 5)
    assert sorted(a.tolist()) == list(range(1000))
    epoch_order.cache_clear()
    assert np.array_equal(a, epoch_order(1000, 3, 5))
    assert not np.array_equal(a, epoch_order(1000, 3, 6))
    assert not np.array_equal(a, epoch_order(1000, 4, 5))
    assert not a.flags.writeable


def test_batches_roll_over_epochs():
    n, B = 7, 3
    s = PromptSampler(num_prompts=n, seed=2)
    seen = []
    for _ in range(7):  # 21 indices = exactly three epochs
        idx, s = s.global_batch(B)
        seen.extend(idx.tolist())
    assert seen == [i for e in range(3) for i in epoch_order(n, 2, e).tolist()]
    assert (s.epoch, s.offset) == (3, 0)
    big, after = PromptSampler(num_prompts=3).global_batch(8)  # a batch larger than the set spans epochs
    assert big.tolist() == np.concatenate([epoch_order(3, 0, e) for e in range(3)])[:8].tolist()
    assert (after.epoch, after.offset) == (2, 2)


def test_resume_from_saved_state_is_exact():
    n, B = 23, 5
    s = PromptSampler(num_prompts=n, seed=11, fingerprint="abc")
    straight = []
    for step in range(12):
        idx, s = s.global_batch(B)
        straight.append(idx.tolist())
        if step == 4:
            saved = json.loads(json.dumps(s.state_dict()))  # what a checkpoint stores
    epoch_order.cache_clear()
    r = PromptSampler.from_state(saved, num_prompts=n, fingerprint="abc")
    resumed = []
    for _ in range(7):
        idx, r = r.global_batch(B)
        resumed.append(idx.tolist())
    assert resumed == straight[5:]
    assert r == s
    assert "same data config" in one_line_error(PromptSampler.from_state, saved, num_prompts=n + 1)
    assert "same data config" in one_line_error(PromptSampler.from_state, saved, num_prompts=n, fingerprint="xyz")
    assert "lacks" in one_line_error(PromptSampler.from_state, {"epoch": 1}, num_prompts=n)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_shares_reassemble_the_global_batch(process_count):
    n, B = 13, 8
    single = PromptSampler(num_prompts=n, seed=5)
    procs = [PromptSampler(num_prompts=n, seed=5) for _ in range(process_count)]
    for _ in range(6):  # crosses epoch boundaries
        want, single = single.global_batch(B)
        shares = []
        for p in range(process_count):
            share, procs[p] = procs[p].batch_for_process(B, p, process_count)
            assert len(share) == B // process_count
            shares.append(share)
        assert np.concatenate(shares).tolist() == want.tolist()
        assert all(q == single for q in procs)
    a, _ = PromptSampler(num_prompts=100).batch_for_process(8, 0, 2)
    b, _ = PromptSampler(num_prompts=100).batch_for_process(8, 1, 2)
    assert set(a.tolist()).isdisjoint(b.tolist())


def test_process_share_errors():
    s = PromptSampler(num_prompts=10)
    assert "multiple of 4" in one_line_error(s.batch_for_process, 6, 0, 4)
    one_line_error(s.batch_for_process, 8, 2, 2)
    one_line_error(s.global_batch, 0)
    one_line_error(PromptSampler, num_prompts=0)
    one_line_error(PromptSampler, num_prompts=5, offset=5)


# --- local files -----------------------------------------------------------------------------------------


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "An answer."},
    {"role": "user", "content": "Follow-up?"},
]


def test_local_files_every_format_and_field(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p1", "x": 1}, {"prompt": "p2"}])
    assert read_prompt_texts(str(jsonl)) == ["p1", "p2"]
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"instruction": "i1", "other": "o"}, {"instruction": "i2", "other": "o"}]))
    assert read_prompt_texts(str(js)) == ["i1", "i2"]
    assert read_prompt_texts(str(js), field="other") == ["o", "o"]
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({"prompt": ["c1", "c2"], "id": [1, 2]}))
    assert read_prompt_texts(str(columns)) == ["c1", "c2"]
    lines_json = tmp_path / "d.json"  # JSON lines under a .json name
    lines_json.write_text('{"prompt": "l1"}\n{"prompt": "l2"}\n')
    assert read_prompt_texts(str(lines_json)) == ["l1", "l2"]
    chat = write_jsonl(tmp_path / "e.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:2]}])
    assert read_prompt_texts(str(chat)) == ["First question?", "First question?"]
    parquet = tmp_path / "f.parquet"
    pq.write_table(pa.table({"messages": [CHAT, [{"role": "user", "content": "Only turn"}]], "id": [0, 1]}), parquet)
    assert read_prompt_texts(str(parquet)) == ["First question?", "Only turn"]
    pq.write_table(pa.table({"prompt": ["q1", "q2", "q3"]}), tmp_path / "g.parquet")
    assert read_prompt_texts(str(tmp_path / "g.parquet"), limit=2) == ["q1", "q2"]
    # prompt wins over messages when a record has both (ultrafeedback_binarized has both).
    both = write_jsonl(tmp_path / "h.jsonl", [{"messages": CHAT, "prompt": "direct"}])
    assert read_prompt_texts(str(both)) == ["direct"]
    # A messages list without a user turn is empty, counted and dropped.
    nouser = write_jsonl(tmp_path / "i.jsonl", [{"messages": CHAT[:1]}, {"messages": CHAT}])
    assert load_prompts(DataConfig(source=str(nouser))).stats["empty"] == 1


def test_malformed_sources_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    assert f"{bad}:3 is not valid JSON" in one_line_error(read_prompt_texts, str(bad))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('["a"]\n')
    assert f"{notobj}:1" in one_line_error(read_prompt_texts, str(notobj))
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"text": "a", "id": 1}])
    msg = one_line_error(read_prompt_texts, str(nofield))
    assert "no prompt, instruction or messages field" in msg and "text, id" in msg and "data.field" in msg
    assert "no field 'question'" in one_line_error(read_prompt_texts, str(nofield), field="question")
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"prompt": "a"}, {"text": "b"}])
    assert f"{partial}:2 has no 'prompt' field" in one_line_error(read_prompt_texts, str(partial))
    wrongtype = write_jsonl(tmp_path / "num.jsonl", [{"prompt": 3}])
    assert "expected text or a chat message list" in one_line_error(read_prompt_texts, str(wrongtype))
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text("\n" if name.endswith("l") else "[]")
        assert "holds no records" in one_line_error(read_prompt_texts, str(tmp_path / name))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert "holds no records" in one_line_error(read_prompt_texts, str(tmp_path / "empty.parquet"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    assert "not a readable parquet file" in one_line_error(read_prompt_texts, str(tmp_path / "broken.parquet"))
    (tmp_path / "p.csv").write_text("prompt\na\n")
    assert "unknown type '.csv'" in one_line_error(read_prompt_texts, str(tmp_path / "p.csv"))
    assert "does not exist" in one_line_error(read_prompt_texts, str(tmp_path / "missing.jsonl"))
    assert "does not exist" in one_line_error(read_prompt_texts, "./nowhere")
    assert "is not a file" in one_line_error(read_prompt_texts, "not a spec!")
    assert "builtin:prompts" in one_line_error(read_prompt_texts, "builtin:nope")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(source=""), "data.source"),
        (dict(split=" "), "data.split"),
        (dict(field=""), "data.field"),
        (dict(min_prompt_tokens=-1), "data.min_prompt_tokens"),
        (dict(max_prompt_tokens=0), "data.max_prompt_tokens"),
        (dict(min_prompt_tokens=10, max_prompt_tokens=5), "data.max_prompt_tokens"),
        (dict(dedup="yes"), "data.dedup"),
        (dict(heldout_fraction=1.0), "data.heldout_fraction"),
        (dict(heldout_fraction=True), "data.heldout_fraction"),
        (dict(exclude=3), "data.exclude"),
        (dict(seed=-1), "data.seed"),
        (dict(seed=1.5), "data.seed"),
        (dict(limit=0), "data.limit"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs)
    assert str(e.value).startswith(field + "=") and "\n" not in str(e.value)


# --- the shipped set and the command line ----------------------------------------------------------------


def test_builtin_prompts_load():
    if not resources.files("cme_jax.data").joinpath("prompts.jsonl").is_file():
        pytest.skip("cme_jax/data/prompts.jsonl is not present")
    ps = load_prompts(DataConfig())
    assert len(ps.train) == ps.stats["read"] == 320
    assert ps.stats["duplicates"] == ps.stats["empty"] == 0
    assert all(t == clean_prompt(t) for t in ps.train)
    assert ps.fingerprint == load_prompts(DataConfig(source="builtin:prompts")).fingerprint
    # Every shipped prompt fits 512 chat-formatted tokens even with a byte-level 320-token vocabulary.
    ps_tok = load_prompts(DataConfig(), tokenizer=tiny_tokenizer())
    assert ps_tok.stats["too_long"] == 0


def test_cli_prints_stats_and_errors(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "a "}, {"prompt": "b"}])
    main([str(path), "--show", "5"])
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0])["duplicates"] == 1
    assert [json.loads(x) for x in out[1:]] == ["a", "b"]
    assert cli_error(capsys, main, [str(tmp_path / "missing.jsonl")]).startswith("error: prompt file")


# --- datasets: Hub ids offline, dataset directories -------------------------------------------------------

# Runs in a fresh interpreter because `datasets` reads HF_HOME and the offline switches when imported.
HUB_SCRIPT = textwrap.dedent(
    """
    import glob, json, os, shutil, sys
    import datasets, pyarrow as pa, pyarrow.parquet as pq
    from cme_jax.errors import CmeError
    from cme_jax.prompts import DataConfig, load_prompts, read_prompt_texts

    tmp = sys.argv[1]
    os.makedirs(f"{tmp}/src")
    pq.write_table(pa.table({"instruction": ["hub one", "hub  two", "hub one"]}), f"{tmp}/src/train.parquet")
    # Lay out datasets' cache exactly as an earlier online load of tinyorg/tiny_prompts would have.
    builder = datasets.load_dataset_builder("parquet", data_files={"train": f"{tmp}/src/train.parquet"})
    builder.download_and_prepare(f"{tmp}/built")
    cached = os.path.join(datasets.config.HF_DATASETS_CACHE, "tinyorg___tiny_prompts", "default", "0.0.0", "0" * 16)
    os.makedirs(cached)
    shutil.copy(f"{tmp}/built/dataset_info.json", cached)
    shutil.copy(glob.glob(f"{tmp}/built/*-train.arrow")[0], f"{cached}/tiny_prompts-train.arrow")

    out = {"offline": bool(datasets.config.HF_HUB_OFFLINE)}
    out["hub"] = load_prompts(DataConfig(source="tinyorg/tiny_prompts")).train
    out["hub_prefixed_limit"] = read_prompt_texts("hf:tinyorg/tiny_prompts", limit=2)
    out["local_dir"] = read_prompt_texts(f"{tmp}/src")  # a directory of data files goes through load_dataset
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"prompt": ["disk a", "disk b"]})}
    ).save_to_disk(f"{tmp}/saved")
    out["disk"] = read_prompt_texts(f"{tmp}/saved@test")
    errors = {}
    for name, spec in [("missing", "nobody-here/no-such-dataset"), ("split", "tinyorg/tiny_prompts@test"),
                       ("disk_split", f"{tmp}/saved")]:
        try:
            read_prompt_texts(spec)
        except CmeError as e:
            errors[name] = str(e)
    out["errors"] = errors
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_hub_path_offline_and_dataset_directories(tmp_path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["offline"]
    assert out["hub"] == ["hub one", "hub  two"]
    assert out["hub_prefixed_limit"] == ["hub one", "hub  two"]
    assert out["local_dir"] == ["hub one", "hub  two", "hub one"]
    assert out["disk"] == ["disk a", "disk b"]
    errs = out["errors"]
    assert all("\n" not in m for m in errs.values())
    assert errs["missing"].startswith("cannot load dataset 'nobody-here/no-such-dataset'")
    assert "offline mode" in errs["missing"]
    assert "'test'" in errs["split"] and "train" in errs["split"]
    assert "no split 'train'" in errs["disk_split"] and "test" in errs["disk_split"]
