"""Evaluation metrics on fixed inputs: exact KL and entropy against transformers, text statistics, intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cme_jax.errors import CmeError
from cme_jax.eval import evaluation as ev
from cme_jax.eval import judging, stats
from cme_jax.eval.audit import score_forms
from cme_jax.eval.stats import bootstrap_ci
from cme_jax.files import JsonlCache
from cme_jax.metrics import repetition_rate
from cme_jax.models.logprobs import token_kl_jit
from cme_jax.scoring import Verifier, VerifierConfig
from cme_jax.sources import load_model
from tests.train_helpers import write_tiny


@pytest.fixture(scope="module")
def softcapped_pair(tmp_path_factory):
    """Two random Gemma-2-style models (final logit softcap) of one architecture: a policy and its 'base'."""
    root = tmp_path_factory.mktemp("kl_pair")
    return write_tiny(root / "p", "gemma2", 3, 200), write_tiny(root / "q", "gemma2", 4, 200)


def test_token_kl_matches_transformers(softcapped_pair):
    from transformers import AutoModelForCausalLM

    p_dir, q_dir = softcapped_pair
    p, q = load_model(p_dir), load_model(q_dir)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 200, size=(3, 20)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    start = 8
    got = token_kl_jit(p.weights, q.weights, p.cfg, tokens, mask, start=start, chunk_budget=3 * 5 * 200)
    with torch.no_grad():
        lp = torch.log_softmax(AutoModelForCausalLM.from_pretrained(p_dir).eval()(torch.tensor(tokens)).logits, -1)
        lq = torch.log_softmax(AutoModelForCausalLM.from_pretrained(q_dir).eval()(torch.tensor(tokens)).logits, -1)
    lp, lq = lp[:, start - 1 : -1].double(), lq[:, start - 1 : -1].double()
    kl = (lp.exp() * (lp - lq)).sum(-1).numpy()
    ent = -(lp.exp() * lp).sum(-1).numpy()
    assert kl.min() > 0.01  # two random models really differ, so the comparison means something
    np.testing.assert_allclose(np.asarray(got["kl"]), kl, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["entropy"]), ent, rtol=2e-4, atol=2e-5)
    alone = token_kl_jit(p.weights, None, p.cfg, tokens, mask, start=start)
    assert set(alone) == {"entropy"}
    np.testing.assert_allclose(np.asarray(alone["entropy"]), ent, rtol=2e-4, atol=2e-5)
    same = token_kl_jit(p.weights, p.weights, p.cfg, tokens, mask, start=start)
    np.testing.assert_allclose(np.asarray(same["kl"]), 0.0, atol=1e-6)

    # Left padding and masked response slots change nothing at the real tokens and give 0 elsewhere.
    padded = np.zeros((3, 24), np.int32)
    pmask = np.zeros((3, 24), bool)
    padded[:, 4:] = tokens
    pmask[:, 4:] = True
    pmask[0, -3:] = False  # a shorter response in row 0
    out = token_kl_jit(p.weights, q.weights, p.cfg, padded, pmask, start=start + 4)
    np.testing.assert_allclose(np.asarray(out["kl"])[1:], kl[1:], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["kl"])[0, :-3], kl[0, :-3], rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(out["kl"])[0, -3:] == 0)


def test_token_metrics_per_output_means(softcapped_pair):
    p_dir, q_dir = softcapped_pair
    p, q = load_model(p_dir), load_model(q_dir)
    policy = ev.Policy(name="p", source=p_dir, fmt="plain", template="Q: {prompt}\nA:")
    instructions = ["one two", "three", "four five six"]
    outputs = ["alpha beta gamma", "", "delta"]
    got = ev.token_metrics(policy, p, q, instructions, outputs, batch_size=2)
    assert np.isnan(got["kl"][1]) and np.isnan(got["entropy"][1])  # an empty output has no token to average
    tok = p.tokenizer
    for i in (0, 2):
        ctx = list(tok(f"Q: {instructions[i]}\nA:")["input_ids"])
        resp = list(tok(outputs[i], add_special_tokens=False)["input_ids"])
        ids = np.asarray([ctx + resp], np.int32)
        one = token_kl_jit(p.weights, q.weights, p.cfg, ids, np.ones_like(ids, bool), start=len(ctx))
        assert got["kl"][i] == pytest.approx(float(np.asarray(one["kl"]).mean()), rel=1e-5)
        assert got["entropy"][i] == pytest.approx(float(np.asarray(one["entropy"]).mean()), rel=1e-5)
    with pytest.raises(CmeError, match="must share"):
        other = load_model(write_tiny(p_dir + "_other", "llama", 0, 200))
        ev.token_metrics(policy, p, other, instructions, outputs)


def test_repetition_rate_and_output_metrics():
    assert repetition_rate("a b c d a b c d", 4) == pytest.approx(1 / 5)  # 5 four-grams, 'a b c d' twice
    assert repetition_rate("a b c", 4) == 0.0
    assert repetition_rate("x x x x x x", 4) == pytest.approx(2 / 3)  # 3 four-grams, all 'x x x x'
    side = ev.SideOutputs(["a b a b", "one", ""], [True, False, True], [5, 2, 0], {}, reused=False)
    m = ev.output_metrics(side)
    np.testing.assert_array_equal(m["length_tokens"], [5, 2, 0])
    np.testing.assert_array_equal(m["length_words"], [4, 1, 0])
    np.testing.assert_array_equal(m["truncated"], [0, 1, 0])
    assert m["distinct_2"][0] == pytest.approx(2 / 3) and np.isnan(m["distinct_2"][1:]).all()
    fixed = ev.output_metrics(ev.SideOutputs(["a"], None, None, {}, reused=False))
    assert np.isnan(fixed["truncated"]).all() and np.isnan(fixed["length_tokens"]).all()


def test_paired_interval_by_hand():
    model = np.array([1.0, 2.0, np.nan, 4.0])
    base = np.array([0.5, 2.5, 3.0, 3.0])
    got = stats.paired_interval(model, base, seed=3, n_boot=500)
    assert got["model"]["n"] == got["difference"]["n"] == 3  # the prompt the model has no value for drops out
    assert got["model"]["mean"] == pytest.approx(7 / 3)
    assert got["baseline"]["mean"] == pytest.approx(2.0)
    assert got["difference"]["mean"] == pytest.approx((0.5 - 0.5 + 1.0) / 3)
    low, high = bootstrap_ci([0.5, -0.5, 1.0], seed=3, n_boot=500)
    assert (got["difference"]["ci95_low"], got["difference"]["ci95_high"]) == pytest.approx((low, high))
    assert stats.interval(np.array([np.nan]))["mean"] is None


def test_automatic_metrics_intervals_without_verifiers():
    prompts = [ev.EvalPrompt(p) for p in ("p1", "p2", "p3", "p4")]
    sides = {
        "model": ev.SideOutputs(
            ["a b c d a b c d", "x y", "x y z", "w"], [True, True, False, False], [9, 3, 4, 2], {}, False
        ),
        "baseline": ev.SideOutputs(
            ["a b", "c d e", "f", "g h i j"], [True, False, False, True], [3, 4, 2, 5], {}, False
        ),
    }
    tokens = {"model": {"kl": np.array([0.1, 0.2, np.nan, 0.3])}}
    auto, rows = ev.automatic_metrics(prompts, sides, tokens=tokens, n_boot=200)
    iv = auto["intervals"]
    assert iv["length_tokens"]["difference"]["mean"] == pytest.approx(np.mean([6, -1, 2, -3]))
    assert iv["truncated"]["model"]["mean"] == pytest.approx(0.5)
    assert iv["truncated"]["baseline"]["mean"] == pytest.approx(0.5)
    assert iv["repetition_4"]["model"]["mean"] == pytest.approx(0.2 / 4)
    assert iv["kl"]["model"]["mean"] == pytest.approx(0.2) and "difference" not in iv["kl"]
    assert auto["model"]["kl"] == pytest.approx(0.2)
    assert [r["model_kl"] for r in rows] == [0.1, 0.2, None, 0.3]
    report = ev.automatic_report(auto, "m", "b")
    assert "KL to the reference" in report and "cut at the token limit" in report
    assert "| mean length (own tokens) | 4.5 | 3.5 | 1.000 [" in report


def test_score_forms_cache_skips_scored_rows(gemma, tmp_path):
    verifier = Verifier.from_model(VerifierConfig("gemma3-270m", context="plain", template="Q: {prompt}\nA:"), gemma)
    prompts, texts = ["Name a colour.", "Name a fruit."], ["Blue.", "An apple, or a pear."]
    cache = JsonlCache(tmp_path / "scores.jsonl")
    first = score_forms(verifier, prompts, texts, cache=cache, batch_size=2)
    assert len(cache) == 4  # each text after its prompt's context and after the empty prompt's
    lines = (tmp_path / "scores.jsonl").read_text().splitlines()
    again = score_forms(verifier, prompts, texts, cache=JsonlCache(tmp_path / "scores.jsonl"), batch_size=2)
    assert (tmp_path / "scores.jsonl").read_text().splitlines() == lines  # nothing new was scored
    get = lambda f, key: f.form(True, "") if key == "contrastive" else getattr(f, key)
    for key in ("plain", "contrastive", "count", "empty"):
        np.testing.assert_array_equal(get(first, key), get(again, key))
    fresh = score_forms(verifier, prompts, texts, batch_size=2)
    np.testing.assert_allclose(first.plain, fresh.plain, rtol=1e-6)
    assert json.loads(json.loads(lines[0])["output"])[1] > 0  # a stored row holds its scored token count
    other = Verifier.from_model(VerifierConfig("gemma3-270m", context="plain", template="{prompt}"), gemma)
    score_forms(other, prompts[:1], texts[:1], cache=cache, batch_size=1)
    assert len(cache) == 6  # another template is another verifier: nothing is shared


def test_likelihood_reply_with_a_bias():
    assert judging.likelihood_reply([-1.0, -2.0]).startswith("[[A]]")  # log-odds +1 > 0
    assert judging.likelihood_reply([-1.0, -2.0], bias=1.5).startswith("[[B]]")  # +1 is below this judge's A-preference
    assert judging.likelihood_reply([-1.0, -2.0], bias=0.5) == "[[A]] (log p A=-1.0000, B=-2.0000; bias 0.5000)"
    assert judging.likelihood_reply([-3.0, -2.0], bias=-1.5).startswith("[[A]]")  # -1 > -1.5


def test_likelihood_bias_splits_verdicts_evenly(smollm, tmp_path):
    from cme_jax.eval.audit import shipped_pairs
    from cme_jax.eval.judging import run_pairwise, summarize_records

    pairs = shipped_pairs()[:3]
    bias = judging.likelihood_bias(smollm, pairs, batch_size=6)
    plain = judging.local_judge(smollm, verdict="likelihood", batch_size=6)
    calibrated = judging.local_judge(smollm, verdict="likelihood", batch_size=6, bias=bias)
    assert plain.judge_id != calibrated.judge_id and f"bias={bias:.6f}" in calibrated.judge_id
    items = [judging.PairItem(p.prompt, p.chosen, p.rejected) for p in pairs]
    before = summarize_records(run_pairwise(items, plain, JsonlCache(None)))
    after = summarize_records(run_pairwise(items, calibrated, JsonlCache(None)))
    assert before["first_position_rate"] == 1.0  # uncalibrated, this small judge answers A to everything
    # 6 conversations (3 pairs, both orders): the median splits them 3 A / 3 B, whatever the answers say.
    assert after["first_position_rate"] == pytest.approx(0.5)
