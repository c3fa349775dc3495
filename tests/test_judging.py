"""Pairwise judging: verdict parsing, scoring arithmetic, AlpacaEval parity, and a real local HTTP judge."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import socket
import sys
import types

import numpy as np
import pytest

from cme_jax.errors import CmeError
from cme_jax.eval.audit import PreferencePair, shipped_pairs
from cme_jax.eval.judging import (
    EARLY_STOP_PAIRS,
    IDENTICAL_NOTE,
    JUDGE_SYSTEM,
    JUDGE_SYSTEM_VERDICT,
    UNPARSED_FOLLOWUP,
    FunctionJudge,
    OpenAIJudge,
    PairItem,
    UnusableJudgeError,
    audit_sentence,
    cache_key,
    combine,
    judge_and_report,
    judge_audit,
    pair_items,
    parse_verdict,
    read_model_outputs,
    render_pairwise,
    run_pairwise,
    summarize,
    summarize_records,
    write_model_outputs,
    write_results,
)
from cme_jax.eval.stats import bootstrap_ci
from cme_jax.files import JsonlCache
from tests.helpers import EVAL_RESULT_KEYS, no_proxy
from tests.json_server import ChatServer

SECRET = "sk-test-SECRET-7f3a9c1e5b"

# ----------------------------------------------------------------------------- parse_verdict

VERDICT_CASES: list[tuple[str | None, str | None]] = [
    # plain and decorated tags
    ("[[A]]", "A"),
    ("[[B]]", "B"),
    ("[[C]]", "C"),
    ("[[a]]", "A"),
    ("[[b]]", "B"),
    ("[[c]]", "C"),
    ("[[ A ]]", "A"),
    ("[[\tb\t]]", "B"),
    ("[[ c]]", "C"),
    ("[ [A] ]", "A"),
    ("**[[A]]**", "A"),
    ("[[**B**]]", "B"),
    ("[[*C*]]", "C"),
    ("`[[A]]`", "A"),
    ("[[`B`]]", "B"),
    ("__[[C]]__", "C"),
    ("\\[\\[A\\]\\]", "A"),
    ("\\[\\[ b \\]\\]", "B"),
    ("### Verdict\n\n[[A]]", "A"),
    ("> [[B]]", "B"),
    ("- Final: [[C]]", "C"),
    # extra text around
    ("Final verdict: [[A]]", "A"),
    ("My final verdict is: [[B]].", "B"),
    ("Both responses are equally accurate. [[C]]", "C"),
    ("Response A answers the question directly, B rambles.\n\nVerdict: [[A]]\n", "A"),
    ("[[A]]\nResponse A is better because it is correct.", "A"),
    ("Verdict: [[B]] </s>", "B"),
    ("Réponse B est meilleure. [[B]] ✅", "B"),
    ("The better response is [[A]]!", "A"),
    ("Answer: [[B]]\n\n\n", "B"),
    ("Assessment\n- A: correct\n- B: wrong\n\n**Final verdict:** [[A]]", "A"),
    ("It's a tie: [[C]]", "C"),
    ("Neither is better.\n\n[[ C ]]", "C"),
    # the same tag repeated
    ("[[A]][[A]]", "A"),
    ("[[A]] [[A]]", "A"),
    ("**[[B]]** ([[B]])", "B"),
    ("I choose [[C]]. Final: [[C]]", "C"),
    # several different tags: the last one counts when it stands alone
    ("The options are [[A]], [[B]] or [[C]]. Response A is better, so [[A]]", "A"),
    ("I first thought [[A]], but on reflection B handles the edge case: [[B]]", "B"),
    ("[[A]] would be fair if length mattered; it does not. Final verdict: [[C]]", "C"),
    ("[[B]]\n\nWait, A is actually correct and B is not. Corrected verdict: [[A]]", "A"),
    ("Not [[A]] and not [[B]]; they are equivalent. [[C]]", "C"),
    # ...but a trailing run of different tags is the options restated or a hedge: ambiguous
    ("[[A]] or [[B]]", None),
    ("[[A]], [[B]] or [[C]]", None),
    ("Reply with [[A]], [[B]], or [[C]].", None),
    ("Final verdict: [[A]] and [[C]]", None),
    ("[[A]]/[[B]]", None),
    ("[[A]] vs [[B]]", None),
    ("[[A]]\n[[B]]", None),
    ("[[A]] | [[C]]", None),
    ("Response B is best. Format: [[A]], [[B]], [[C]]", None),
    # nothing usable
    (None, None),
    ("", None),
    ("   \n", None),
    ("A", None),
    ("B is better.", None),
    ("Verdict: A", None),
    ("[A]", None),
    ("[B] is better than [A].", None),
    ("[[A]", None),
    ("[A]]", None),
    ("[[D]]", None),
    ("[[AB]]", None),
    ("[[A or B]]", None),
    ("[[tie]]", None),
    ("[[ ]]", None),
    ("[[1]]", None),
    ("((A))", None),
    ("{{A}}", None),
    ("I cannot judge these responses.", None),
    ("As an AI language model I refuse to answer.", None),
    ("Response A: [[", None),
]


@pytest.mark.parametrize(("text", "expected"), VERDICT_CASES)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_parse_verdict_case_count():
    """The issue asks for a large set of messy judge outputs."""
    assert len(VERDICT_CASES) >= 60


# ----------------------------------------------------------------------------- combine

COMBINE_TABLE = [
    # (model as A, model as B) -> score; order 2 shows the model as B, so "B" there is a model win.
    ("A", "B", 1.0),  # model wins both
    ("B", "A", 0.0),  # baseline wins both
    ("C", "C", 0.5),  # tie both
    ("A", "A", 0.5),  # judge always picks the first shown: split
    ("B", "B", 0.5),  # judge always picks the second shown: split
    ("A", "C", 0.5),  # win + tie
    ("C", "B", 0.5),  # tie + win
    ("B", "C", 0.5),  # loss + tie
    ("C", "A", 0.5),  # tie + loss
    (None, "B", None),
    ("A", None, None),
    (None, None, None),
]


@pytest.mark.parametrize(("v_a", "v_b", "expected"), COMBINE_TABLE)
def test_combine(v_a, v_b, expected):
    assert combine(v_a, v_b) == expected


# ----------------------------------------------------------------------------- summarize / bootstrap

HAND_VERDICTS = [
    ("A", "B"),  # win, consistent
    ("A", "B"),  # win, consistent
    ("B", "A"),  # loss, consistent
    ("C", "C"),  # tie, consistent
    ("A", "A"),  # split -> tie, inconsistent
    ("A", "C"),  # win + tie -> tie, inconsistent
    (None, "B"),  # unparsed
    ("B", "B"),  # split -> tie, inconsistent
]
HAND_MODEL_LEN = [10, 20, 30, 40, 50, 60, 70, 80]
HAND_BASE_LEN = [5, 5, 5, 5, 5, 5, 5, 45]


def test_summarize_hand_computed():
    s = summarize(HAND_VERDICTS, HAND_MODEL_LEN, HAND_BASE_LEN, seed=0)
    assert s["n"] == 7
    assert s["n_total"] == 8
    assert (s["wins"], s["ties"], s["losses"], s["unparsed"]) == (2, 4, 1, 1)
    assert s["win_rate_tie_adjusted"] == pytest.approx(4 / 7)  # (2 + 0.5 * 4) / 7
    assert s["position_consistency"] == pytest.approx(4 / 7)  # pairs 1-4 agree after un-swapping
    # decisive verdicts: 11 (C excluded); of those, 6 pick whatever was shown first (A)
    assert s["first_position_rate"] == pytest.approx(6 / 11)
    assert s["model_mean_length"] == pytest.approx(45.0)  # 360 / 8
    assert s["base_mean_length"] == pytest.approx(10.0)  # 80 / 8
    assert s["ci95_low"] <= s["win_rate_tie_adjusted"] <= s["ci95_high"]
    assert s["bootstrap_resamples"] == 2000 and s["seed"] == 0
    json.dumps(s)  # results.json must serialise: no numpy scalars, no NaN


def test_summarize_nothing_parsed():
    s = summarize([(None, "A"), ("B", None)], [3, 4], [5, 6])
    assert (s["n"], s["unparsed"], s["n_total"]) == (0, 2, 2)
    assert s["win_rate_tie_adjusted"] is None and s["ci95_low"] is None and s["ci95_high"] is None
    assert s["position_consistency"] is None
    assert "NaN" not in json.dumps(s)


def test_summarize_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        summarize([("A", "B")], [1, 2], [1])


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([1.0] * 25, (1.0, 1.0)),  # all wins: every resample has mean 1
        ([0.0] * 10, (0.0, 0.0)),
        ([0.5], (0.5, 0.5)),  # one prompt: every resample is that prompt
        # two prompts, one win one loss: resample means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4,
        # so the 2.5th percentile is 0 and the 97.5th is 1
        ([1.0, 0.0], (0.0, 1.0)),
    ],
)
def test_bootstrap_degenerate_cases(scores, expected):
    assert bootstrap_ci(scores, seed=3) == pytest.approx(expected)


def test_bootstrap_empty():
    assert bootstrap_ci([]) is None


def test_bootstrap_deterministic_and_sane():
    rng = np.random.default_rng(1)
    scores = rng.choice([0.0, 0.5, 1.0], size=400, p=[0.3, 0.2, 0.5]).tolist()
    a = bootstrap_ci(scores, seed=7)
    assert a == bootstrap_ci(scores, seed=7)
    assert a != bootstrap_ci(scores, seed=8)
    mean = float(np.mean(scores))
    assert a[0] < mean < a[1]
    # close to the normal approximation mean +- 1.96 sd / sqrt(n) for n = 400
    half = 1.96 * np.std(scores, ddof=1) / np.sqrt(len(scores))
    assert a[0] == pytest.approx(mean - half, abs=0.012)
    assert a[1] == pytest.approx(mean + half, abs=0.012)


# ----------------------------------------------------------------------------- AlpacaEval parity


@pytest.fixture(scope="module")
def alpaca_metrics():
    """alpaca_eval's own metrics; its utils import pkg_resources, gone from setuptools >= 81, so shim it."""
    if importlib.util.find_spec("alpaca_eval") is None:
        pytest.skip("pip install alpaca-eval==0.6.6")
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        shim = types.ModuleType("pkg_resources")
        shim.parse_version = parse
        shim.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))
        sys.modules["pkg_resources"] = shim
    from alpaca_eval.metrics import get_winrate, pairwise_to_winrate

    return get_winrate, pairwise_to_winrate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_win_rate_matches_alpaca_eval(alpaca_metrics, seed):
    _, pairwise_to_winrate = alpaca_metrics
    rng = np.random.default_rng(seed)
    choices = ["A", "B", "C", None]
    verdicts = [
        (choices[rng.choice(4, p=[0.4, 0.3, 0.25, 0.05])], choices[rng.choice(4, p=[0.3, 0.4, 0.25, 0.05])])
        for _ in range(150)
    ]
    s = summarize(verdicts, [1] * 150, [1] * 150)
    prefs = [1.0 + combine(a, b) for a, b in verdicts if combine(a, b) is not None]
    ref = pairwise_to_winrate(prefs)
    assert s["win_rate_tie_adjusted"] * 100 == pytest.approx(float(ref["discrete_win_rate"]))
    assert s["win_rate_tie_adjusted"] * 100 == pytest.approx(float(ref["win_rate"]))
    assert (s["wins"], s["ties"], s["losses"], s["n"]) == (
        int(ref["n_wins"]),
        int(ref["n_draws"]),
        int(ref["n_wins_base"]),
        int(ref["n_total"]),
    )


def test_judgments_jsonl_preferences_read_by_alpaca_eval(alpaca_metrics, tmp_path):
    """The `preference` column of judgments.jsonl is AlpacaEval's encoding."""
    get_winrate, _ = alpaca_metrics
    items = [PairItem(f"q{i}", "m" * (i % 5 + 1), "b" * 3) for i in range(20)]
    records = run_pairwise(items, longer_wins_judge(), JsonlCache(None))
    summary = summarize_records(records)
    write_results(tmp_path, records, summary, "m", "b")
    rows = [json.loads(x) for x in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    ref = get_winrate([{"preference": r["preference"]} for r in rows if r["preference"] is not None])
    assert summary["win_rate_tie_adjusted"] * 100 == pytest.approx(float(ref["discrete_win_rate"]))


# ----------------------------------------------------------------------------- prompts, files


def test_render_pairwise_shows_both_outputs():
    msgs = render_pairwise("Name a prime.", "Seven.", "Nine.")
    assert msgs[0] == {"role": "system", "content": JUDGE_SYSTEM}
    user = msgs[1]["content"]
    assert msgs[1]["role"] == "user"
    assert user.index("Name a prime.") < user.index("Seven.") < user.index("Nine.")
    assert "[[A]]" in user and "[[B]]" in user and "[[C]]" in user
    assert parse_verdict(user) is None  # the instructions restate the options, never a verdict


def test_model_outputs_roundtrip(tmp_path):
    p = tmp_path / "sub" / "model_outputs.json"
    write_model_outputs(p, ["q1", "q2"], ["o1", "o2"], generator="policy-step100", dataset="helpful_base")
    rows = json.loads(p.read_text())
    assert rows == [
        {"instruction": "q1", "output": "o1", "generator": "policy-step100", "dataset": "helpful_base"},
        {"instruction": "q2", "output": "o2", "generator": "policy-step100", "dataset": "helpful_base"},
    ]
    write_model_outputs(p, ["q1", "q2"], ["o1", "o2"], generator="g", dataset=["x", None])
    rows = read_model_outputs(p)
    assert rows[0]["dataset"] == "x" and "dataset" not in rows[1]
    write_model_outputs(p, ["q"], ["ü"], generator="g")
    assert read_model_outputs(p) == [{"instruction": "q", "output": "ü", "generator": "g"}]
    with pytest.raises(ValueError):
        write_model_outputs(p, ["q1"], ["o1", "o2"], generator="g")


def test_read_model_outputs_errors(tmp_path):
    with pytest.raises(CmeError, match="cannot read"):
        read_model_outputs(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CmeError, match="not valid JSON"):
        read_model_outputs(bad)
    bad.write_text(json.dumps([{"output": "x"}]))
    with pytest.raises(CmeError, match="entry 0"):
        read_model_outputs(bad)


def test_pair_items_matches_by_instruction():
    model = [{"instruction": "q2", "output": "m2", "dataset": "d"}, {"instruction": "q1", "output": "m1"}]
    base = [{"instruction": "q1", "output": "b1"}, {"instruction": "q2", "output": "b2"}]
    assert pair_items(model, base) == [PairItem("q2", "m2", "b2", "d"), PairItem("q1", "m1", "b1", None)]
    with pytest.raises(CmeError, match="1 model instructions"):
        pair_items([*model, {"instruction": "q3", "output": "m3"}], base)


# ----------------------------------------------------------------------------- fake judges


def _outputs(messages):
    """The two responses the pairwise prompt shows."""
    user = messages[1]["content"]
    a = re.search(r"<response_a>\n(.*?)\n</response_a>", user, re.S).group(1)
    b = re.search(r"<response_b>\n(.*?)\n</response_b>", user, re.S).group(1)
    return a, b


def prefer_longer(messages) -> str:
    """A deterministic judge: the longer response wins, equal lengths tie; follow-ups get the bare tag."""
    a, b = _outputs(messages)
    tag = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
    if len(messages) > 2:
        return f"[[{tag}]]"
    return f"Response {tag} is more complete.\n\nFinal verdict: [[{tag}]]"


def longer_wins_judge(**kw) -> FunctionJudge:
    return FunctionJudge(lambda convs: [prefer_longer(m) for m in convs], judge_id="prefer-longer", **kw)


def test_run_pairwise_with_function_judge():
    items = [
        PairItem("q0", "long model answer", "short"),  # win
        PairItem("q1", "short", "long base answer"),  # loss
        PairItem("q2", "abcd", "wxyz"),  # equal length: tie
        PairItem("q3", "same", " same\n"),  # identical after strip: tie, never sent
    ]
    asked = []

    def fn(convs):
        asked.extend(convs)
        return [prefer_longer(m) for m in convs]

    records = run_pairwise(items, FunctionJudge(fn, "j"), JsonlCache(None))
    assert [r.outcome for r in records] == ["win", "loss", "tie", "tie"]
    assert [(r.verdict_model_as_a, r.verdict_model_as_b) for r in records[:3]] == [
        ("A", "B"),
        ("B", "A"),
        ("C", "C"),
    ]
    assert records[3].judge_output_model_as_a == [IDENTICAL_NOTE]
    assert len(asked) == 6  # 3 pairs x 2 orders
    # order 1 shows the model as A, order 2 as B
    assert _outputs(asked[0]) == ("long model answer", "short")
    assert _outputs(asked[1]) == ("short", "long model answer")
    assert records[0].model_length == len("long model answer") and records[0].base_length == len("short")


def test_unparsed_retry_and_count():
    """Garbage first, then a verdict after the follow-up; always-garbage pairs are counted, not dropped."""
    seen = []

    def fn(convs):
        out = []
        for m in convs:
            seen.append(m)
            instr = m[1]["content"]
            if "ALWAYS" in instr or ("ONCE" in instr and len(m) == 2):
                out.append("Both responses have merit.")
            else:
                out.append(prefer_longer(m))
        return out

    items = [
        PairItem("ONCE q", "longer one", "short"),
        PairItem("ALWAYS q", "x", "yy"),
        PairItem("q", "a", "bb"),
    ]
    records = run_pairwise(items, FunctionJudge(fn, "j"), JsonlCache(None), retries_unparsed=2)
    once, always, plain = records
    assert once.outcome == "win"
    assert once.judge_output_model_as_a == ["Both responses have merit.", "[[A]]"]
    assert always.outcome == "unparsed" and always.score is None
    assert len(always.judge_output_model_as_a) == 3 and len(always.judge_output_model_as_b) == 3
    assert plain.outcome == "loss" and len(plain.judge_output_model_as_a) == 1
    retry = [m for m in seen if len(m) > 2]
    assert all(m[2]["role"] == "assistant" and m[3]["content"] == UNPARSED_FOLLOWUP for m in retry)
    assert sorted(len(m) for m in retry) == [4, 4, 4, 4, 6, 6]  # the second retry continues the first
    assert len(seen) == 6 + 2 + 2 * 2  # first round, ONCE retried once, ALWAYS retried twice per order
    s = summarize_records(records)
    assert (s["n"], s["unparsed"], s["wins"], s["losses"]) == (2, 1, 1, 1)
    # retries_unparsed=0: no follow-up at all
    records0 = run_pairwise(items, FunctionJudge(fn, "j2"), JsonlCache(None), retries_unparsed=0)
    assert [r.outcome for r in records0] == ["unparsed", "unparsed", "loss"]


def test_crash_and_resume_function_judge(tmp_path):
    """The judge raises after k replies; the rerun with the same cache asks only what was never answered."""
    items = [PairItem(f"q{i}", "m" * (i % 4 + 1), "b" * 2) for i in range(10)]
    answered: list[str] = []
    budget = {"left": 7}

    def fn(convs):
        out = []
        for m in convs:
            if budget["left"] == 0:
                raise RuntimeError("judge process died")
            budget["left"] -= 1
            answered.append(json.dumps(m))
            out.append(prefer_longer(m))
        return out

    path = tmp_path / "cache.jsonl"
    with pytest.raises(RuntimeError):
        run_pairwise(items, FunctionJudge(fn, "j", batch_size=1), JsonlCache(path))
    assert len(JsonlCache(path)) == 7
    budget["left"] = 10**9
    records = run_pairwise(items, FunctionJudge(fn, "j", batch_size=1), JsonlCache(path))
    assert len(answered) == 20 and len(set(answered)) == 20  # nobody paid twice
    fresh = run_pairwise(items, longer_wins_judge(), JsonlCache(None))
    assert [r.to_json() for r in records] == [r.to_json() for r in fresh]


def test_cache_survives_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = JsonlCache(path)
    cache.put("k1", "j", "[[A]]")
    with path.open("a") as f:
        f.write('{"key": "k2", "judge": "j", "outp')  # killed mid-write
    cache = JsonlCache(path)
    assert cache.skipped_lines == 1 and cache.get("k1") == "[[A]]" and "k2" not in cache
    cache.put("k3", "j", "[[B]]")
    reloaded = JsonlCache(path)
    assert reloaded.get("k3") == "[[B]]" and reloaded.skipped_lines == 1


def test_cache_key_depends_on_judge():
    items = [PairItem("q", "long answer", "short")]
    cache = JsonlCache(None)
    run_pairwise(items, longer_wins_judge(), cache)
    calls = []
    other = FunctionJudge(lambda c: calls.extend(c) or ["[[C]]"] * len(c), judge_id="another-judge")
    assert run_pairwise(items, other, cache)[0].outcome == "tie"
    assert len(calls) == 2


# ----------------------------------------------------------------------------- verdict-only prompts


def test_verdict_only_judge_gets_the_verdict_prompt():
    seen = []

    def fn(convs):
        seen.extend(convs)
        return [prefer_longer(m) for m in convs]

    items = [PairItem("q", "long answer", "s")]
    records = run_pairwise(items, FunctionJudge(fn, "v", verdict_only=True), JsonlCache(None))
    assert records[0].outcome == "win" and len(seen) == 2
    assert seen[0] == render_pairwise("q", "long answer", "s", verdict_only=True)
    assert seen[1] == render_pairwise("q", "s", "long answer", verdict_only=True)
    system, user = seen[0][0]["content"], seen[0][1]["content"]
    assert system == JUDGE_SYSTEM_VERDICT != JUDGE_SYSTEM and system.endswith("Give your verdict only.")
    assert "[[A]] if response A is better, [[B]] if response B is better." in user
    assert "[[C]]" not in user and "reasoning" not in user
    assert _outputs(seen[0]) == ("long answer", "s")
    # an explicit verdict_only=False overrides the judge's attribute: the usual prompt, another cache key
    seen.clear()
    run_pairwise(items, FunctionJudge(fn, "v", verdict_only=True), JsonlCache(None), verdict_only=False)
    assert seen[0] == render_pairwise("q", "long answer", "s") and seen[0][0]["content"] == JUDGE_SYSTEM
    assert cache_key("v", seen[0]) != cache_key("v", render_pairwise("q", "long answer", "s", verdict_only=True))


# ----------------------------------------------------------------------------- early stop


def _instruction(messages) -> str:
    return re.search(r"<instruction>\n(.*?)\n</instruction>", messages[1]["content"], re.S).group(1)


def test_early_stop_on_a_judge_that_never_gives_a_verdict(tmp_path):
    items = [PairItem(f"q{i}", f"model answer {i}", "base") for i in range(20)]
    asked = []

    def fn(convs):
        asked.extend(convs)
        return ["Both responses have their merits."] * len(convs)

    path = tmp_path / "cache.jsonl"
    judge = FunctionJudge(fn, "never-decides", batch_size=4)
    with pytest.raises(UnusableJudgeError) as e:
        run_pairwise(items, judge, JsonlCache(path), retries_unparsed=2, early_stop=8)
    msg = str(e.value)
    assert isinstance(e.value, CmeError) and "\n" not in msg
    assert "no parseable verdict on 8 of the first 8 pairs" in msg and "before the other 12" in msg
    assert "never-decides" in msg and "--judge-url" in msg and "--judge-verdict likelihood" in msg
    # only the first 8 pairs were asked: 2 orders x (1 + 2 follow-ups) each, every reply cached
    assert len(asked) == 8 * 2 * 3
    assert {_instruction(m) for m in asked} == {f"q{i}" for i in range(8)}
    assert len(JsonlCache(path)) == 48
    # a rerun stops the same way from the cache, asking nothing
    asked.clear()
    with pytest.raises(UnusableJudgeError):
        run_pairwise(items, judge, JsonlCache(path), retries_unparsed=2, early_stop=8)
    assert asked == []
    # off (the default), or no more items than the probe: every pair is judged and reported as unparsed
    assert all(r.outcome == "unparsed" for r in run_pairwise(items[:8], judge, JsonlCache(path), early_stop=8))
    asked.clear()
    records = run_pairwise(items, judge, JsonlCache(None), retries_unparsed=0)
    assert len(asked) == 40 and all(r.outcome == "unparsed" for r in records)
    with pytest.raises(CmeError, match="early_stop must be >= 0"):
        run_pairwise(items, judge, JsonlCache(None), early_stop=-1)


@pytest.mark.parametrize(("bad", "stops"), [(4, False), (5, True)])
def test_early_stop_needs_more_than_half_unparsed(bad, stops):
    """Exactly half of the first K unparsed goes on; one more stops. Later pairs never count."""
    items = [PairItem(f"{'BAD ' if i < bad or i >= 8 else ''}q{i}", "long answer", "short") for i in range(12)]
    asked = []

    def fn(convs):
        asked.extend(convs)
        return ["No idea." if _instruction(m).startswith("BAD") else prefer_longer(m) for m in convs]

    judge = FunctionJudge(fn, "half")
    if stops:
        with pytest.raises(UnusableJudgeError, match=f"on {bad} of the first 8 pairs"):
            run_pairwise(items, judge, JsonlCache(None), retries_unparsed=1, early_stop=8)
        assert len(asked) == 8 * 2 + bad * 2
    else:
        records = run_pairwise(items, judge, JsonlCache(None), retries_unparsed=1, early_stop=8)
        assert [r.outcome for r in records] == ["unparsed"] * 4 + ["win"] * 4 + ["unparsed"] * 4
        assert len(asked) == 12 * 2 + 8 * 2


# ----------------------------------------------------------------------------- judge audit


def always_a_judge() -> FunctionJudge:
    return FunctionJudge(lambda convs: ["Final verdict: [[A]]"] * len(convs), judge_id="always-a")


def chosen_judge(pairs) -> FunctionJudge:
    """Picks whichever response is a chosen text of `pairs`: a perfect judge of them."""
    chosen = {p.chosen for p in pairs}

    def fn(convs):
        return ["[[A]]" if _outputs(m)[0] in chosen else "[[B]]" for m in convs]

    return FunctionJudge(fn, judge_id="knows-chosen")


def test_judge_audit_hand_computed(tmp_path):
    pairs = shipped_pairs()[:6]
    asked = []
    judge = always_a_judge()
    inner = judge.fn
    judge.fn = lambda convs: asked.extend(convs) or inner(convs)
    cache = JsonlCache(tmp_path / "cache.jsonl")
    a = judge_audit(judge, pairs, cache)
    # always [[A]]: chosen wins when shown first, loses when shown second -> every pair a split (0.5)
    assert (a["pairs"], a["n"], a["unparsed"]) == (6, 6, 0)
    assert a["accuracy"] == 0.5 and (a["ci95_low"], a["ci95_high"]) == (0.5, 0.5)
    assert (a["accuracy_chosen_first"], a["accuracy_chosen_second"]) == (1.0, 0.0)
    assert a["position_consistency"] == 0.0 and a["first_position_rate"] == 1.0
    assert a["judge"] == "always-a" and a["source"] == "builtin:preference_pairs"
    # chosen plays the model: order 1 shows chosen as A
    assert _outputs(asked[0]) == (pairs[0].chosen, pairs[0].rejected) and _instruction(asked[0]) == pairs[0].prompt
    assert _outputs(asked[1]) == (pairs[0].rejected, pairs[0].chosen)
    assert len(asked) == 12 and len(cache) == 12
    assert judge_audit(judge, pairs, cache) == a and len(asked) == 12  # cached: nothing asked again

    perfect = judge_audit(chosen_judge(pairs), pairs, JsonlCache(None))
    assert perfect["accuracy"] == 1.0 and (perfect["ci95_low"], perfect["ci95_high"]) == (1.0, 1.0)
    assert perfect["accuracy_chosen_first"] == perfect["accuracy_chosen_second"] == 1.0
    assert perfect["position_consistency"] == 1.0 and perfect["first_position_rate"] == 0.5

    # the longer answer wins, equal lengths tie: a win, a loss and a tie, all consistent
    mixed = [
        PreferencePair("p0", "a long chosen answer", "short"),
        PreferencePair("p1", "terse", "a long rejected answer"),
        PreferencePair("p2", "abcd", "wxyz"),
    ]
    m = judge_audit(longer_wins_judge(), mixed, JsonlCache(None))
    assert m["accuracy"] == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3
    assert m["accuracy_chosen_first"] == pytest.approx(0.5) and m["accuracy_chosen_second"] == pytest.approx(0.5)
    assert m["position_consistency"] == 1.0 and m["first_position_rate"] == 0.5  # 2 of 4 decisive verdicts
    assert m["ci95_low"] < 0.5 < m["ci95_high"]
    json.dumps(a)
    with pytest.raises(CmeError, match="at least one preference pair"):
        judge_audit(judge, [], JsonlCache(None))


def test_judge_audit_stops_early_on_an_unusable_judge():
    asked = []
    judge = FunctionJudge(lambda c: asked.extend(c) or ["Hmm."] * len(c), judge_id="mute")
    with pytest.raises(UnusableJudgeError, match="8 of the first 8 pairs"):
        judge_audit(judge, shipped_pairs(), JsonlCache(None), retries_unparsed=1)
    assert len(asked) == EARLY_STOP_PAIRS * 2 * 2


def test_audit_in_results_and_report(tmp_path):
    pairs = shipped_pairs()[:6]
    items = [PairItem("q0", "long model answer", "short"), PairItem("q1", "abc", "xyz")]
    records = run_pairwise(items, longer_wins_judge(), JsonlCache(None))
    summary = summarize_records(records)
    weak = judge_audit(always_a_judge(), pairs, JsonlCache(None))
    write_results(tmp_path, records, summary, "m", "b", judge_id="prefer-longer", audit=weak)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["judge_audit"] == weak and results["win_rate_tie_adjusted"] == 0.75
    lines = (tmp_path / "report.md").read_text().splitlines()
    audit_line = next(i for i, x in enumerate(lines) if x.startswith("**Judge audit:**"))
    rate_line = next(i for i, x in enumerate(lines) if x.startswith("Judged in both orders"))
    table = lines.index("| metric | value |")
    assert rate_line < audit_line < table  # read right after the win rate
    text = lines[audit_line]
    assert "judge accuracy on 6 shipped preference pairs" in text and "**50.0%** [50.0%, 50.0%]" in text
    assert "position consistency 0.0%" in text and "first-shown answer in 100.0%" in text
    assert "cannot reliably tell a better answer from a worse one" in text

    good = judge_audit(chosen_judge(pairs), pairs, JsonlCache(None))
    write_results(tmp_path, records, summary, "m", "b", judge_id="prefer-longer", audit=good)
    text = (tmp_path / "report.md").read_text()
    assert "**100.0%** [100.0%, 100.0%]" in text and "position consistency 100.0%" in text
    assert "a judge near 50% cannot separate the policies" in text and "cannot reliably" not in text
    # without an audit nothing changes
    write_results(tmp_path, records, summary, "m", "b")
    assert "judge_audit" not in json.loads((tmp_path / "results.json").read_text())
    assert "Judge audit" not in (tmp_path / "report.md").read_text()
    assert "no usable verdict" in audit_sentence({"n": 0, "pairs": 4, "source": "builtin:preference_pairs"})


# ----------------------------------------------------------------------------- HTTP server


class FakeOpenAI(ChatServer):
    """The chat-completions server with switchable failure modes, answering with `server_reply`."""

    def __init__(self):
        super().__init__()
        self.mode = "healthy"  # healthy | flaky | down | unauthorized

    def fault(self, h, conv, attempt):
        digest = int(hashlib.sha256(conv.encode()).hexdigest(), 16)
        if self.mode == "unauthorized":
            key = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
            self.send(h, 401, {"error": {"message": f"Incorrect API key provided: {key}"}})
        elif self.mode == "down":
            self.send(h, 503, {"error": {"message": "overloaded"}})
        elif self.mode == "flaky" and attempt == 1 and digest % 3 == 0:
            self.drop(h)
        elif self.mode == "flaky" and attempt == 1 and digest % 3 == 1:
            self.send(h, 500, {"error": {"message": "internal"}})
        elif self.mode == "flaky" and attempt == 1:
            self.send(h, 429, {"error": {"message": "rate limited"}}, [("Retry-After", "0")])
        elif self.mode == "flaky" and attempt == 2 and digest % 2 == 0:
            self.send(h, 200, b"<html>bad gateway</html>")  # a 200 that is no completion
        else:
            return False
        return True

    def reply(self, body):
        return server_reply(body["messages"])


@pytest.fixture
def server(monkeypatch):
    no_proxy(monkeypatch)
    monkeypatch.setenv("JUDGE_TEST_KEY", SECRET)
    s = FakeOpenAI()
    yield s
    s.close()


def make_judge(server, **kw) -> OpenAIJudge:
    args = dict(
        base_url=server.base_url,
        model="judge-1",
        api_key_env="JUDGE_TEST_KEY",
        max_concurrency=4,
        max_retries=4,
        backoff=0.001,
        timeout=10.0,
    )
    return OpenAIJudge(**{**args, **kw})


HTTP_ITEMS = [
    PairItem("Explain rain.", "Water vapour condenses into droplets that fall.", "Clouds.", "d1"),  # win
    PairItem("Name a colour.", "Red.", "Blue is a colour of the sky.", "d1"),  # loss
    PairItem("Say hi.", "Hello", "Howdy", "d2"),  # equal length: tie
    PairItem("Repeat x.", "x", "x"),  # identical: tie without a request
    PairItem("GARBAGE_ONCE: add 2+2.", "2 + 2 = 4, because...", "4"),  # win after one follow-up
    PairItem("ALWAYS_GARBAGE: pick one.", "one", "the other one"),  # unparsed
] + [PairItem(f"Question {i}?", "m" * (i % 3 + 1), "bb") for i in range(10)]


def server_reply(messages) -> str:
    """What the fake server says: garbage on request, else the longer response wins."""
    instr = messages[1]["content"]
    if "ALWAYS_GARBAGE" in instr or ("GARBAGE_ONCE" in instr and len(messages) == 2):
        return "Both answers have strengths and weaknesses."
    return prefer_longer(messages)


def expected_outcomes():
    """Outcomes of HTTP_ITEMS from the same replies without HTTP in between."""
    judge = FunctionJudge(lambda convs: [server_reply(m) for m in convs], judge_id="local")
    return [r.outcome for r in run_pairwise(HTTP_ITEMS, judge, JsonlCache(None))]


def test_http_end_to_end(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    judge = make_judge(server)
    assert SECRET not in repr(judge) and SECRET not in str(dataclasses.asdict(judge))
    summary = judge_and_report(HTTP_ITEMS, judge, tmp_path / "eval", "policy", "base", seed=0)
    records = [json.loads(x) for x in (tmp_path / "eval" / "judgments.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records][:6] == ["win", "loss", "tie", "tie", "win", "unparsed"]
    assert [r["outcome"] for r in records] == expected_outcomes()
    assert records[5]["preference"] is None and records[5]["score"] is None
    assert len(records[5]["judge_output_model_as_a"]) == 3  # first try + 2 follow-ups
    assert records[0]["preference"] == 2.0 and records[1]["preference"] == 1.0 and records[2]["preference"] == 1.5
    assert summary["unparsed"] == 1 and summary["n"] == len(HTTP_ITEMS) - 1
    # every request carried the key as a Bearer header
    assert server.auth and all(a == f"Bearer {SECRET}" for a in server.auth)
    # 15 judged pairs x 2 orders, + 2 follow-ups for GARBAGE_ONCE, + 4 for ALWAYS_GARBAGE
    assert len(server.answered) == 15 * 2 + 2 + 4 == len(set(server.answered))

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for key in EVAL_RESULT_KEYS:
        assert key in results
    assert results["model"] == "policy" and results["baseline"] == "base" and "judge-1" in results["judge"]
    assert results["win_rate_tie_adjusted"] == pytest.approx((results["wins"] + 0.5 * results["ties"]) / results["n"])
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "tie-adjusted win rate" in report and "ALWAYS_GARBAGE" in report and "report.png" in report
    png = (tmp_path / "eval" / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    # the key never reaches a written file or a log line
    for f in (tmp_path / "eval").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in caplog.text

    # a rerun with the same cache asks the server nothing
    n_before = len(server.answered)
    again = judge_and_report(HTTP_ITEMS, judge, tmp_path / "eval", "policy", "base", seed=0)
    assert len(server.answered) == n_before and again == summary


def test_http_retries_on_flaky_server(server, caplog):
    caplog.set_level(logging.WARNING)
    server.mode = "flaky"
    judge = make_judge(server)
    records = run_pairwise(HTTP_ITEMS, judge, JsonlCache(None))
    assert [r.outcome for r in records] == expected_outcomes()
    # every kind of failure happened and was retried
    assert {0, 500, 429}.issubset(set(server.statuses))
    assert any("retry" in m for m in caplog.messages)
    assert SECRET not in caplog.text
    assert len(server.answered) == len(set(server.answered))  # retries are not re-answered conversations


def test_http_gives_up_after_max_retries(server):
    server.mode = "down"
    judge = make_judge(server, max_retries=2, max_concurrency=2)
    with pytest.raises(CmeError, match=r"failed 3 times; last error: HTTP 503") as e:
        judge.judge([render_pairwise("q", "a", "b")])
    assert SECRET not in str(e.value)
    assert len(server.statuses) == 3


def test_http_crash_and_resume(server, tmp_path):
    """The endpoint dies after k answers (the run fails); the rerun re-sends no answered conversation."""
    server.down_after = 9
    path = tmp_path / "cache.jsonl"
    with pytest.raises(CmeError):
        run_pairwise(HTTP_ITEMS, make_judge(server, max_retries=1), JsonlCache(path))
    assert len(server.answered) == 9
    assert len(JsonlCache(path)) == 9  # every answered conversation was cached, in-flight ones included
    server.down_after = None
    records = run_pairwise(HTTP_ITEMS, make_judge(server), JsonlCache(path))
    assert [r.outcome for r in records] == expected_outcomes()
    assert len(server.answered) == len(set(server.answered)) == 15 * 2 + 2 + 4
    assert SECRET.encode() not in path.read_bytes()


def test_http_unauthorized_fails_at_once_without_leaking_key(server):
    server.mode = "unauthorized"
    judge = make_judge(server)
    with pytest.raises(CmeError, match="HTTP 401") as e:
        judge.judge([render_pairwise("q", "a", "b")])
    assert SECRET not in str(e.value) and "check the API key" in str(e.value)
    assert len(server.statuses) == 1  # a 401 is not retried


def test_missing_key_env(monkeypatch):
    monkeypatch.delenv("JUDGE_MISSING_KEY", raising=False)
    with pytest.raises(CmeError, match="JUDGE_MISSING_KEY is not set"):
        OpenAIJudge(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="JUDGE_MISSING_KEY")


def test_no_key_endpoint(server):
    judge = make_judge(server, api_key_env=None)
    assert parse_verdict(judge.judge([render_pairwise("q", "long", "s")])[0]) == "A"
    assert server.auth == [None]


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = OpenAIJudge(
        base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None, max_retries=2, backoff=0.001
    )
    with pytest.raises(CmeError, match="failed 3 times"):
        judge.judge([render_pairwise("q", "a", "b")])
