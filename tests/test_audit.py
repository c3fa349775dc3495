"""Tests for the verifier audit: its statistics, preference pairs, scoring path, report files and command line."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_hf import tiny_model, tiny_tokenizer

from cme_jax import audit
from cme_jax.errors import CmeError
from cme_jax.eval import audit as audit_lib
from cme_jax.eval.audit import (
    KINDS,
    PreferencePair,
    combined_forms,
    load_hub_pairs,
    make_rewrites,
    pair_from_record,
    run_audit,
    shipped_pairs,
    start_audit,
    summarize_scores,
    warning_lines,
)
from cme_jax.eval.stats import average_ranks, spearman, win_rate
from cme_jax.scoring import Verifier, VerifierConfig, score_texts
from cme_jax.sources import load_model
from tests.helpers import assert_one_line_error, cli_error, run_module

SLOTS = ("chosen", "rejected", *KINDS)
TINY_PAIRS = [
    PreferencePair("What is two plus two?", "Two plus two is four. It is basic math.", "It is five, I think."),
    PreferencePair("Name a primary color.", "Red is a primary color. So are blue and yellow.", "Green, probably."),
    PreferencePair("Is ice cold?", "Yes, ice is cold. It is frozen water!", "No. Ice is hot.", "factual_error"),
]


# ----------------------------------------------------------------------------------------------------------
# Statistics against hand-computed values


def test_win_rate_counts_ties_half():
    w = win_rate([3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0], n_boot=200)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_bootstrap_interval_matches_the_binomial_quantiles():
    # Outcomes 1,1,1,0: a resample's mean is Binomial(4, 3/4) / 4. P(mean <= 0) = 1/256 = 0.4% and
    # P(mean <= 1/4) = 13/256 = 5.1%, so the 2.5% quantile is 1/4; P(mean <= 3/4) = 175/256 = 68%,
    # so the 97.5% quantile is 1.
    w = win_rate([1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], n_boot=20000, seed=3)
    assert w["rate"] == 0.75
    assert (w["ci95_low"], w["ci95_high"]) == (0.25, 1.0)
    # Unanimous outcomes have no spread; two items split either way span everything.
    up, down = win_rate([2.0] * 5, [1.0] * 5), win_rate([0.0] * 5, [1.0] * 5)
    assert (up["ci95_low"], up["ci95_high"], down["ci95_low"], down["ci95_high"]) == (1.0, 1.0, 0.0, 0.0)
    split = win_rate([1.0, 0.0], [0.0, 1.0], n_boot=5000)
    assert (split["rate"], split["ci95_low"], split["ci95_high"]) == (0.5, 0.0, 1.0)


def test_win_rate_interval_is_reproducible_for_a_seed():
    a, b = np.random.default_rng(0).normal(size=(2, 30))
    assert win_rate(a, b, seed=1) == win_rate(a, b, seed=1)
    w = win_rate(a, b, seed=1)
    assert w["ci95_low"] <= w["rate"] <= w["ci95_high"]


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(average_ranks([10, 20, 10, 30]), [1.5, 3.0, 1.5, 4.0])
    np.testing.assert_array_equal(average_ranks([5, 5, 5]), [2.0, 2.0, 2.0])


def test_spearman_hand_computed():
    # ranks of y are 1, 2, 3.5, 5, 3.5: sum dx*dy = 8, sum dx^2 = 10, sum dy^2 = 9.5.
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(10 * 9.5))
    assert spearman([1, 2, 3], [10, 20, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [4, 4, 4]) is None
    assert spearman([1], [2]) is None
    stats = pytest.importorskip("scipy.stats")
    x, y = np.random.default_rng(1).integers(0, 5, size=(2, 40))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_summary_and_warnings_from_hand_made_scores():
    # Three pairs; the verifier prefers chosen twice, and the 'filler' rewrite beats the original twice.
    scores = {s: np.zeros(3) for s in SLOTS}
    scores["chosen"] = np.array([-1.0, -2.0, -3.0])
    scores["rejected"] = np.array([-2.0, -3.0, -1.0])
    for k in KINDS:
        scores[k] = scores["chosen"] - 1.0
    scores["filler"] = np.array([0.0, 0.0, -4.0])
    scores["refusal"] = scores["chosen"].copy()  # ties everywhere: 50%, no warning
    lengths = np.arange(3 * len(SLOTS), dtype=float).reshape(3, len(SLOTS))
    s = summarize_scores(scores, lengths, KINDS, n_boot=100)
    assert s["pairwise"]["rate"] == pytest.approx(2 / 3)
    assert s["rewrites"]["filler"]["rate"] == pytest.approx(1 / 3)
    assert s["rewrites"]["refusal"]["rate"] == 0.5 and s["rewrites"]["truncate"]["rate"] == 1.0
    # Lengths of chosen, rejected per pair: 0,1 | 9,10 | 18,19 against scores -1,-2 | -2,-3 | -3,-1.
    assert s["length_spearman"] == pytest.approx(spearman([0, 1, 9, 10, 18, 19], [-1, -2, -2, -3, -3, -1]))
    lines = warning_lines([{"verifier": "v", "form": "plain", **s}])
    assert len(lines) == 1 and "'filler'" in lines[0] and "on 2 of 3 pairs" in lines[0]


def test_combination_weights_and_per_pair_zscore():
    from cme_jax.rewards import RewardInputs, VerifierForms

    rng = np.random.default_rng(0)
    per = {n: {f: rng.normal(size=6) for f in ("plain", "contrastive")} for n in ("a", "b")}
    zeros = np.zeros(6, bool)
    forms = {
        n: VerifierForms(p["plain"], np.ones(6, np.int32), zeros, zeros, bare=p["plain"] - p["contrastive"])
        for n, p in per.items()
    }
    configs = [VerifierConfig(model=n, name=n) for n in ("a", "b")]
    combine_forms = lambda per, w, size, zscore=False: combined_forms(
        configs, RewardInputs(empty=zeros, verifiers=forms, group_size=size), w, zscore=zscore
    )
    out = combine_forms(per, {"a": 2.0, "b": -0.5}, 3)
    np.testing.assert_allclose(out["plain"], 2.0 * per["a"]["plain"] - 0.5 * per["b"]["plain"], rtol=1e-5)

    def z(x):  # population z-score inside each pair's group of 3 texts
        g = x.reshape(-1, 3)
        return ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).ravel()

    out = combine_forms(per, {"a": 2.0, "b": -0.5}, 3, zscore=True)
    want = 2.0 * z(per["a"]["contrastive"]) - 0.5 * z(per["b"]["contrastive"])
    np.testing.assert_allclose(out["contrastive"], want, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Pairs and rewrites


def test_shipped_pairs_load():
    pairs = shipped_pairs()
    assert len(pairs) == 48 and all(p.flaw for p in pairs)
    assert all(p.prompt.strip() and p.chosen.strip() and p.rejected.strip() for p in pairs)


def test_records_with_chat_message_lists():
    conv = lambda answer: [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": answer}]
    p = pair_from_record({"prompt": "Hello?", "chosen": conv("Good."), "rejected": conv("Bad.")}, "row")
    assert p == PreferencePair("Hello?", "Good.", "Bad.")
    assert pair_from_record({"chosen": conv("A."), "rejected": "B."}, "row") == PreferencePair("Hi?", "A.", "B.")
    with pytest.raises(CmeError, match="row needs a string 'prompt'"):
        pair_from_record({"chosen": "A.", "rejected": "B."}, "row")
    with pytest.raises(CmeError, match="no assistant message"):
        pair_from_record({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "B."}, "row")


def test_local_dataset_directory_loads_through_datasets(tmp_path):
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    rows = [
        {"prompt": "Q1?", "chosen": conv("Q1?", "Good one."), "rejected": conv("Q1?", "Bad one."), "score": 1},
        {"prompt": "Q2?", "chosen": conv("Q2?", ""), "rejected": conv("Q2?", "Bad two."), "score": 2},
        {"prompt": "Q3?", "chosen": conv("Q3?", "Good three."), "rejected": conv("Q3?", "Bad three."), "score": 3},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_hub_pairs(str(tmp_path), "train")
    assert [p.chosen for p in pairs] == ["Good one.", "Good three."]  # the empty response is skipped
    assert load_hub_pairs(str(tmp_path), "train", limit=1) == pairs[:1]


def test_rewrites_are_deterministic_and_draw_other_prompts():
    pairs = shipped_pairs()[:5]
    rw = make_rewrites(pairs, seed=0)
    assert rw == make_rewrites(pairs, seed=0) and rw != make_rewrites(pairs, seed=1)
    chosen = {p.prompt: p.chosen for p in pairs}
    for p, row in zip(pairs, rw):
        assert set(row) == set(KINDS)
        assert all(t.strip() and t.strip() != p.chosen.strip() for t in row.values())
        assert row["other_prompt"] in [c for q, c in chosen.items() if q != p.prompt]
    with pytest.raises(CmeError, match="at least two pairs with different prompts"):
        make_rewrites([pairs[0], dataclasses.replace(pairs[1], prompt=pairs[0].prompt)])


# ----------------------------------------------------------------------------------------------------------
# The scoring path, on a tiny random model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, LoadedModel) of a tiny random Llama whose tokenizer has a chat template."""
    path = tmp_path_factory.mktemp("tiny_audit")
    tiny_model("llama", vocab_size=320).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, load_model(str(path))


def tiny_configs(path):
    return [
        VerifierConfig(model=str(path), name="chat", max_length=48),
        VerifierConfig(
            model=str(path), name="plain", context="plain", template="Q: {prompt}\nA:", max_length=48, contrastive=True
        ),
    ]


def read_items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """An audit of the tiny pairs with two verifiers (chat; plain template, configured contrastive)."""
    path, model = tiny
    out = tmp_path_factory.mktemp("tiny_run")
    verifiers = [Verifier.from_model(c, model) for c in tiny_configs(path)]
    summary = run_audit(verifiers, TINY_PAIRS, out, weights=[1.0, 0.5], n_boot=300, progress=False)
    return out, summary, verifiers


def test_audit_scores_are_score_texts(tiny, tiny_run):
    out, summary, verifiers = tiny_run
    items = read_items(out)
    prompts = [it["prompt"] for it in items for _ in SLOTS]
    texts = [it[s] if s in ("chosen", "rejected") else it["rewrites"][s] for it in items for s in SLOTS]
    combined = {f: np.zeros(len(texts)) for f in ("plain", "contrastive")}
    for v, w in zip(verifiers, (1.0, 0.5)):
        for form, contrastive in (("plain", False), ("contrastive", True)):
            ref = Verifier.from_model(dataclasses.replace(v.config, contrastive=contrastive), tiny[1])
            want = score_texts(ref, prompts, texts).mean
            got = [it["scores"][v.name][form][s] for it in items for s in SLOTS]
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
            combined[form] += w * want
    for form in combined:
        got = [it["scores"]["combined"][form][s] for it in items for s in SLOTS]
        np.testing.assert_allclose(got, combined[form], atol=1e-5, rtol=0)
    assert [v["name"] for v in summary["verifiers"]] == ["chat", "plain"]
    assert summary["combined"] == {"weights": {"chat": 1.0, "plain": 0.5}, "zscore": False}
    assert not any(r["trained"] for r in summary["results"])  # only a training run's audit marks a form


@pytest.mark.slow
def test_audit_scores_equal_the_score_command(tiny, tiny_run, tmp_path):
    path = tiny[0]
    items = read_items(tiny_run[0])
    rows = [
        {"prompt": it["prompt"], "response": it[s] if s in ("chosen", "rejected") else it["rewrites"][s]}
        for it in items
        for s in SLOTS
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Each verifier of the tiny run in both forms, named after the column the command writes.
    forms = {"plain": False, "contrastive": True}
    columns = {(c.name, f): f"{c.name}_{f}" for c in tiny_configs(path) for f in forms}
    verifiers = [
        {**dataclasses.asdict(c), "name": columns[c.name, f], "contrastive": forms[f]}
        for c in tiny_configs(path)
        for f in forms
    ]
    (tmp_path / "v.yaml").write_text(json.dumps({"verifiers": verifiers}))
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    args += ["--config", str(tmp_path / "v.yaml"), "--no-progress"]
    proc = run_module("cme_jax.score", *args)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for (name, form), col in columns.items():
        mine = [it["scores"][name][form][s] for it in items for s in SLOTS]
        np.testing.assert_allclose([g[f"cme_{col}"] for g in got], mine, atol=1e-5, rtol=0)


def test_cli_with_a_training_config(tiny, tmp_path, capsys):
    path = tiny[0]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in TINY_PAIRS))
    config = {
        "run_dir": "runs/x",
        "model": {"policy": "smollm2-135m-instruct"},
        "reward": {
            "terms": [{"name": "cme", "weight": 2.0}],
            "verifiers": [dataclasses.asdict(c) for c in tiny_configs(path)[:1]]
            + [{**dataclasses.asdict(tiny_configs(path)[1]), "weight": 0.5}],
            "zscore": True,
        },
    }
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    out = tmp_path / "out"
    args = ["--config", str(tmp_path / "train.yaml"), "--pairs", str(pairs), "--out", str(out), "--bootstrap", "50"]
    summary = audit.main(args)
    assert summary["combined"] == {"weights": {"chat": 2.0, "plain": 1.0}, "zscore": True}
    assert summary["pairs"] == {"source": str(pairs), "count": 3}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert "audit: 3 pairs" in err and "pairwise accuracy" in err


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


def test_bad_input_gives_one_line(tiny, tmp_path, capsys):
    path = str(tiny[0])
    out = ["--out", str(tmp_path / "out")]
    assert "no verifier given" in cli_error(capsys, audit.main, out)
    v = ["--verifier", path]
    assert "pairs file" in cli_error(capsys, audit.main, [*v, *out, "--pairs", str(tmp_path / "none.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{oops\n')
    assert "bad.jsonl:2 is not valid JSON" in cli_error(capsys, audit.main, [*v, *out, "--pairs", str(bad)])
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    assert "bad.jsonl:1 needs 'rejected'" in cli_error(capsys, audit.main, [*v, *out, "--pairs", str(bad)])
    bad.write_text('{"prompt": "p", "chosen": " ", "rejected": "b"}\n')
    assert "empty prompt, chosen or rejected" in cli_error(capsys, audit.main, [*v, *out, "--pairs", str(bad)])
    assert "--limit must be >= 2" in cli_error(capsys, audit.main, [*v, *out, "--limit", "1"])
    assert "must be a string containing '{prompt}'" in cli_error(capsys, audit.main, [*v, *out, "--template", "Q:"])
    assert "named" in cli_error(capsys, audit.main, [*v, *v, *out])
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(capsys, audit.main, [*v, "--out", str(tmp_path / "file")])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {policy: x}\n")
    assert "has no reward.verifiers" in cli_error(capsys, audit.main, ["--config", str(cfg), *out])
    cfg.write_text(f"verifiers: [{path}]\nwieght: 2\n")
    assert "unknown key 'wieght'" in cli_error(capsys, audit.main, ["--config", str(cfg), *out])
    cfg.write_text(f"reward: {{verifiers: [{{model: {path}, context: chatty}}]}}\n")
    assert "verifier.context='chatty'" in cli_error(capsys, audit.main, ["--config", str(cfg), *out])
    cfg.write_text(f"reward: {{verifiers: [{{model: {path}, name: combined}}]}}\n")
    assert "may not be named 'combined'" in cli_error(capsys, audit.main, ["--config", str(cfg), *out])


@pytest.mark.slow
def test_unreachable_hub_dataset_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["--verifier", "gemma3-270m", "--dataset", "HuggingFaceH4/ultrafeedback_binarized", "--out", str(tmp_path)]
    proc = run_module("cme_jax.audit", *args, env=env, timeout=300)
    err = assert_one_line_error(proc.returncode, proc.stderr, "--pairs")
    assert err.startswith("error: cannot load dataset 'HuggingFaceH4/ultrafeedback_binarized'")


# ----------------------------------------------------------------------------------------------------------
# End to end with both embedded models


def check_results_match_items(summary: dict, items: list[dict]) -> None:
    """Recompute every rate and correlation of results.json from the per-item scores in items.jsonl."""
    assert summary["pairs"]["count"] == len(items)
    for r in summary["results"]:
        s = {slot: np.array([it["scores"][r["verifier"]][r["form"]][slot] for it in items]) for slot in SLOTS}
        beat = lambda a, b: float(np.mean((a > b) + 0.5 * (a == b)))
        assert r["pairwise"]["rate"] == pytest.approx(beat(s["chosen"], s["rejected"]))
        assert r["pairwise"]["ci95_low"] <= r["pairwise"]["rate"] <= r["pairwise"]["ci95_high"]
        for k in KINDS:
            assert r["rewrites"][k]["rate"] == pytest.approx(beat(s["chosen"], s[k])), (r["verifier"], k)
            assert r["rewrites"][k]["n"] == len(items)
        assert r["mean"]["chosen"] == pytest.approx(s["chosen"].mean())
        flaws = np.array([it["flaw"] for it in items])
        assert set(r["pairwise_by_flaw"]) == set(flaws.tolist())
        for f, w in r["pairwise_by_flaw"].items():
            assert w["rate"] == pytest.approx(beat(s["chosen"][flaws == f], s["rejected"][flaws == f]))
        try:
            from scipy.stats import spearmanr
        except ImportError:
            continue
        lengths = [it["length"][slot] for it in items for slot in ("chosen", "rejected")]
        cme = [it["scores"][r["verifier"]][r["form"]][slot] for it in items for slot in ("chosen", "rejected")]
        assert r["length_spearman"] == pytest.approx(spearmanr(lengths, cme).statistic)
    flagged = sum(w["rate"] < 0.5 for r in summary["results"] for w in r["rewrites"].values())
    assert len(summary["warnings"]) == flagged


@pytest.mark.slow
def test_start_audit_with_both_embedded_models_writes_the_report(gemma, smollm, tmp_path):
    configs = [
        VerifierConfig(model="gemma3-270m", context="plain", template="Question: {prompt}\nAnswer:", max_length=32),
        VerifierConfig(model="smollm2-135m-instruct", context="chat", max_length=32, contrastive=True),
    ]
    verifiers = [Verifier.from_model(configs[0], gemma), Verifier.from_model(configs[1], smollm)]
    warnings = start_audit(verifiers, [1.0, 0.5], tmp_path, limit=4, batch_size=64, progress=False)
    summary = json.loads((tmp_path / "results.json").read_text())
    items = read_items(tmp_path)
    assert warnings == summary["warnings"]
    assert all(w.startswith("audit: ") for w in warnings)
    assert [it["prompt"] for it in items] == [p.prompt for p in shipped_pairs()[:4]]
    names = ["gemma3-270m", "smollm2-135m-instruct", "combined"]
    assert [(r["verifier"], r["form"]) for r in summary["results"]] == [(n, f) for n in names for f in audit_lib.FORMS]
    # The run trains gemma's plain CME and smollm's contrastive CME.
    assert [r["trained"] for r in summary["results"]] == [True, False, False, True, False, False]
    assert [v["chat"] for v in summary["verifiers"]] == [False, True]
    check_results_match_items(summary, items)
    for it in items:
        assert all(0 < it["tokens"][n][s] <= 32 for n in names[:2] for s in SLOTS)
        for n in names[:2]:
            assert it["scores"][n]["plain"]["chosen"] < 0  # a mean log-probability
    report = (tmp_path / "report.md").read_text()
    for n in names:
        assert f"| {n} | plain |" in report
    acc = summary["results"][0]["pairwise"]
    assert f"{100 * acc['rate']:.0f}% [{100 * acc['ci95_low']:.0f}%, {100 * acc['ci95_high']:.0f}%]" in report
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
