"""Reward registry: config validation, closed-form z-scoring and weights, baselines on hand-set logits, guards."""

from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import tiny_model, tiny_tokenizer

from cme_jax.errors import CmeError
from cme_jax.models.transformer import ModelConfig, init_weights
from cme_jax.rewards import (
    RewardBatch,
    RewardConfig,
    RewardTerm,
    combine_rewards,
    compute_rewards,
    device_reward_fn,
    distinct_n,
    distinct_ngrams,
    join_prompts,
    ngram_repetition,
    policy_response_stats,
    reward_config_from_dict,
    zscore_groups,
)
from cme_jax.scoring import Verifier, VerifierConfig, score_texts
from cme_jax.sources import load_model

# ----------------------------------------------------------------------------------------------------------
# Config


def test_reward_config_defaults_and_yaml_shapes():
    rc = reward_config_from_dict(
        {
            "terms": ["cme", ["length", 0.01], {"name": "self_certainty", "weight": -0.5}],
            "verifiers": ["gemma3-270m", {"model": "org/judge", "weight": 2.0, "context": "plain"}],
            "zscore": True,
        }
    )
    assert rc.terms == (RewardTerm("cme"), RewardTerm("length", 0.01), RewardTerm("self_certainty", -0.5))
    assert [v.name for v in rc.verifiers] == ["gemma3-270m", "judge"] and rc.verifiers[1].weight == 2.0
    assert rc.empty_reward == -10.0 and rc.repetition_penalty == 0 and rc.length_penalty == 0
    assert hash(rc) == hash(
        reward_config_from_dict({"terms": rc.terms, "verifiers": list(rc.verifiers), "zscore": True})
    )
    assert RewardConfig(terms=("random",)).needs_policy_tokens and not rc.verifiers[0].contrastive


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        (dict(terms=()), "reward.terms is empty"),
        (dict(terms=("length",), verifiers=("m",)), "no 'cme' term uses them"),
        (dict(terms=("length", "length")), "lists 'length' twice"),
        (dict(terms=("lenght",)), "reward term 'lenght' is not allowed"),
        (dict(terms=(("length", "x"),)), "weight='x'"),
        (
            dict(
                terms=({"name": "length", "w": 1},),
            ),
            "needs 'name'",
        ),
        (dict(verifiers=("a/m", "b/m")), "two verifiers are named 'm'"),
        (dict(verifiers=({"model": "m", "wieght": 1},)), "unknown key 'wieght'"),
        (dict(verifiers=({"name": "x"},)), "needs a 'model'"),
        (dict(verifiers=("m",), zscore="yes"), "reward.zscore"),
        (dict(verifiers=("m",), empty_reward=float("-inf")), "reward.empty_reward"),
        (dict(verifiers=("m",), repetition_penalty=-1), "reward.repetition_penalty"),
        (dict(verifiers=("m",), repetition_ngram=0), "reward.repetition_ngram"),
        (dict(verifiers=("m",), length_penalty_start=1.5), "reward.length_penalty_start"),
    ],
)
def test_reward_config_rejects_bad_values_in_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        RewardConfig(**kw)
    assert "\n" not in str(e.value)


def test_default_config_is_a_valid_schema_but_cme_needs_verifiers_when_used():
    rc = RewardConfig()
    assert rc.term_names == ("cme",) and rc.verifiers == ()
    with pytest.raises(CmeError, match=r"needs reward\.verifiers"):
        compute_rewards(rc, RewardBatch(["p"], ["r"]))


def test_reward_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key 'z_score'"):
        reward_config_from_dict({"verifiers": ["m"], "z_score": True})


# ----------------------------------------------------------------------------------------------------------
# Closed forms: z-scoring, weights, n-grams


def test_zscore_groups_closed_form():
    x = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 1.0, 2.0, 100.0])
    valid = np.array([True] * 8 + [False])
    z = np.asarray(zscore_groups(x, valid, 3, eps=0.0))
    s = math.sqrt(2 / 3)  # population std of 1, 2, 3
    np.testing.assert_allclose(z, [-1 / s, 0, 1 / s, 0, 0, 0, -1, 1, 0], atol=1e-6)


def test_combine_weights_and_zscore_closed_form():
    a = np.array([1.0, 3.0, 2.0, 4.0])
    b = np.array([10.0, 10.0, 0.0, 6.0])
    valid = np.ones(4, bool)
    raw = np.asarray(combine_rewards({"a": a, "b": b}, {"a": 0.5, "b": -2.0}, valid, 2))
    np.testing.assert_allclose(raw, 0.5 * a - 2.0 * b, atol=1e-6)
    z = np.asarray(combine_rewards({"a": a, "b": b}, {"a": 0.5, "b": -2.0}, valid, 2, zscore=True, eps=0.0))
    # Groups of two: z is -1 / +1 unless both are equal (then 0).
    np.testing.assert_allclose(z, [0.5 * -1, 0.5 * 1, 0.5 * -1 - 2.0 * -1, 0.5 * 1 - 2.0 * 1], atol=1e-6)


def test_ngram_repetition_and_distinct_closed_form():
    tokens = np.array([[1, 2, 1, 2, 1, 2, 9], [3, 4, 5, 6, 0, 0, 0], [7, 7, 0, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]], bool)
    rep = np.asarray(ngram_repetition(tokens, mask, 2))
    # Row 0: bigrams 12 21 12 21 12 -> 2 distinct of 5. Row 1: 3 distinct of 3. Row 2: none.
    np.testing.assert_allclose(rep, [1 - 2 / 5, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(np.asarray(ngram_repetition(tokens, mask, 3)), [1 - 2 / 4, 0.0, 0.0], atol=1e-7)
    assert distinct_n([[1, 2, 1, 2, 1, 2], [3, 4, 5, 6], [7]], 2) == pytest.approx(5 / 8)  # {12,21,34,45,56}
    assert distinct_n([[1]], 2) == 0.0
    # On device, corpus level: bigrams 12 21 12 21 12 | 34 45 56 -> 5 distinct of 8 (none across rows).
    assert float(distinct_ngrams(tokens, mask, 2)) == pytest.approx(5 / 8)
    assert float(distinct_ngrams(tokens[2:], mask[2:], 2)) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Baselines on a model whose logits are set by hand


V = 8
# Next-token logits after each current token: row i is what the model predicts after token i.
TABLE = np.array(
    [
        [0.0] * V,  # uniform: KL(U || p) = 0, entropy log V
        [3.0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2.0, -1.0, 0.5, 0, 0, 0, 0],
        [1.0, 1.0, 1.0, 1.0, -2.0, -2.0, -2.0, -2.0],
        [0, 0, 0, 0, 5.0, 0, 0, 0],
        [-1.0, 0, 1.0, 0, -1.0, 0, 1.0, 0],
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6],
        [4.0, 0, 0, 0, 0, 0, 0, -4.0],
    ]
)


def table_model():
    """A one-layer model whose logits depend only on the current token: logits after token i = TABLE[i].

    The attention and MLP output projections are zero, so the residual stream is the one-hot embedding;
    RMSNorm with scale 1/sqrt(V) maps it back to the one-hot vector and lm_head = TABLE.T reads the row.
    """
    cfg = ModelConfig(
        family="llama",
        vocab_size=V,
        dim=V,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        mlp_dim=16,
        norm_eps=1e-12,
    )
    w = init_weights(cfg, jax.random.key(0))
    layers = w.layers.replace(wo=jnp.zeros_like(w.layers.wo), w_down=jnp.zeros_like(w.layers.w_down))
    w = w.replace(
        embed=jnp.eye(V),
        layers=layers,
        final_norm=jnp.full((V,), 1 / math.sqrt(V)),
        lm_head=jnp.asarray(TABLE.T, jnp.float32),
    )
    return SimpleNamespace(weights=w, cfg=cfg, tokenizer=None)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# Two prompts (left-padded), two responses each; the last token of a stopped response is its stop token (7).
PROMPTS_TOK = np.array([[0, 3, 1], [0, 0, 5]], np.int32)
PROMPTS_MASK = np.array([[0, 1, 1], [0, 0, 1]], bool)
RESP_TOK = np.array([[2, 4, 6, 7, 0], [3, 3, 3, 3, 3], [7, 0, 0, 0, 0], [6, 6, 2, 7, 0]], np.int32)
RESP_MASK = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
STOPPED = np.array([True, False, True, True])


def expected_baselines():
    """Closed-form per-row means over response positions (stop token included), from TABLE."""
    lp = log_softmax(TABLE)
    p = np.exp(lp)
    out = {"self_loglik": [], "neg_entropy": [], "self_certainty": []}
    for r in range(4):
        prev = PROMPTS_TOK[r // 2][PROMPTS_MASK[r // 2]][-1]
        ll, ent, sc = [], [], []
        for t in range(5):
            if not RESP_MASK[r, t]:
                continue
            cur = RESP_TOK[r, t]
            ll.append(lp[prev, cur])
            ent.append(-(p[prev] * lp[prev]).sum())
            sc.append(-math.log(V) - lp[prev].mean())
            prev = cur
        out["self_loglik"].append(np.mean(ll))
        out["neg_entropy"].append(-np.mean(ent))
        out["self_certainty"].append(np.mean(sc))
    return {k: np.array(v) for k, v in out.items()}


def test_policy_baselines_match_closed_form():
    m = table_model()
    tokens, mask = join_prompts(PROMPTS_TOK, PROMPTS_MASK, RESP_TOK, RESP_MASK)
    got = policy_response_stats(m.weights, m.cfg, tokens, mask, start=3)
    want = expected_baselines()
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-5, err_msg=k)
    # Hand check of one number: row 2 is a lone stop token after token 5.
    assert float(got["self_loglik"][2]) == pytest.approx(log_softmax(TABLE[5])[7], abs=1e-6)
    only = policy_response_stats(m.weights, m.cfg, tokens, mask, start=3, entropy=False)
    assert set(only) == {"self_loglik"}


def table_batch(texts=("a", "b", "", "c")):
    return RewardBatch(
        prompts=["p0", "p1"],
        responses=list(texts),
        stopped=STOPPED,
        truncated=~STOPPED,
        response_tokens=RESP_TOK,
        response_mask=RESP_MASK,
        prompt_tokens=PROMPTS_TOK,
        prompt_mask=PROMPTS_MASK,
    )


def test_compute_rewards_baselines_weights_guards_floor_and_diagnostics():
    m = table_model()
    rc = RewardConfig(
        terms=(("self_loglik", 0.5), ("neg_entropy", 2.0), ("self_certainty", -1.0), ("length", 0.1)),
        empty_reward=-3.0,
        repetition_penalty=0.3,
        repetition_ngram=2,
        length_penalty=0.05,
        length_penalty_start=2,
    )
    out = compute_rewards(rc, table_batch(), policy=m)
    b = expected_baselines()
    lengths = np.array([3, 5, 0, 3])  # stop token excluded
    rep = np.array([0.0, 1 - 1 / 4, 0.0, 0.0])  # row 1: bigram 33 four times
    want = 0.5 * b["self_loglik"] + 2.0 * b["neg_entropy"] - 1.0 * b["self_certainty"] + 0.1 * lengths
    want = want - 0.3 * rep - 0.05 * np.maximum(lengths - 2, 0)
    want[2] = -3.0  # empty: the floor
    np.testing.assert_allclose(out.rewards, want, atol=1e-5)
    assert out.empty.tolist() == [False, False, True, False]
    d = out.diagnostics
    assert all(isinstance(v, float) for v in d.values())
    assert d["response/empty"] == 1.0 and d["response/truncated"] == 1.0
    assert d["response/length_mean"] == pytest.approx(lengths.mean())
    assert d["response/distinct_2"] == pytest.approx(5 / 8)  # bigrams 24 46 | 33 x4 | 66 62: 5 distinct of 8
    assert d["length/mean"] == pytest.approx(np.mean([3, 5, 3]))  # over non-empty rows
    assert d["reward/mean"] == pytest.approx(want.mean(), abs=1e-5)


def test_length_and_random_rewards():
    rc = RewardConfig(terms=("length", ("random", 2.0)))
    with pytest.raises(ValueError, match="needs an rng"):
        compute_rewards(rc, table_batch())
    a = compute_rewards(rc, table_batch(), rng=jax.random.key(1))
    again = compute_rewards(rc, table_batch(), rng=jax.random.key(1))
    other = compute_rewards(rc, table_batch(), rng=jax.random.key(2))
    r = a.components["random"]
    assert ((r >= 0) & (r < 1)).all()
    np.testing.assert_array_equal(a.rewards, again.rewards)
    assert not np.allclose(a.rewards, other.rewards)
    np.testing.assert_allclose(a.rewards[[0, 1, 3]], np.array([3, 5, 3]) + 2 * r[[0, 1, 3]], atol=1e-6)


def test_policy_terms_need_the_policy_ids():
    with pytest.raises(CmeError, match="need the policy's response ids"):
        compute_rewards(RewardConfig(terms=("length",)), RewardBatch(["p"], ["r"]))
    with pytest.raises(CmeError, match="needs the policy model"):
        compute_rewards(RewardConfig(terms=("self_loglik",)), table_batch())


def test_non_finite_baseline_fails_naming_the_term():
    m = table_model()
    m.weights = m.weights.replace(lm_head=m.weights.lm_head * jnp.nan)
    with pytest.raises(CmeError, match="reward 'self_certainty' gave 3 non-finite"):
        compute_rewards(RewardConfig(terms=("self_certainty",)), table_batch(), policy=m)


# ----------------------------------------------------------------------------------------------------------
# CME terms through compute_rewards (tiny verifiers, text path)


@pytest.fixture(scope="module")
def tiny_verifiers(tmp_path_factory):
    """Two tiny verifiers with different architectures sharing the tiny tokenizer."""
    out = []
    for family in ("llama", "qwen3"):
        path = tmp_path_factory.mktemp(family)
        tiny_model(family, vocab_size=320).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        out.append(load_model(str(path)))
    return out


PROMPTS = ["hello world", "the quick brown fox"]
RESPONSES = ["one two three", "four five", "", "the lazy dog jumps"]


def test_cme_weights_and_zscore_closed_form(tiny_verifiers):
    cfgs = (
        VerifierConfig(model="llama", name="a", weight=0.7),
        VerifierConfig(model="qwen3", name="b", weight=-1.5, context="plain"),
    )
    vs = [Verifier.from_model(c, m) for c, m in zip(cfgs, tiny_verifiers)]
    rows = [p for p in PROMPTS for _ in range(2)]
    raw = {v.name: score_texts(v, rows, RESPONSES).mean.astype(np.float64) for v in vs}
    batch = RewardBatch(PROMPTS, RESPONSES)
    valid = np.array([True, True, False, True])

    plain = compute_rewards(RewardConfig(terms=(("cme", 2.0),), verifiers=cfgs, empty_reward=-9.0), batch, verifiers=vs)
    want = 2.0 * (0.7 * raw["a"] + -1.5 * raw["b"])
    want[2] = -9.0
    np.testing.assert_allclose(plain.rewards, want, atol=1e-5)
    assert plain.diagnostics["cme/a/mean"] == pytest.approx(raw["a"][valid].mean(), abs=1e-5)
    assert plain.diagnostics["cme/b/std"] == pytest.approx(raw["b"][valid].std(), abs=1e-5)
    assert plain.diagnostics["response/empty"] == 1.0 and plain.diagnostics["cme/a/truncated"] == 0.0

    def z(x):  # groups of two rows; the second group has one valid row, so its z is 0
        g0 = (x[:2] - x[:2].mean()) / (x[:2].std() + 1e-6)
        return np.array([g0[0], g0[1], 0.0, 0.0])

    zs = compute_rewards(RewardConfig(terms=("cme",), verifiers=cfgs, zscore=True), batch, verifiers=vs)
    want = 0.7 * z(raw["a"]) - 1.5 * z(raw["b"])
    want[2] = -10.0
    np.testing.assert_allclose(zs.rewards, want, atol=1e-4)


def test_non_finite_cme_fails_naming_the_verifier(tiny_verifiers):
    import dataclasses

    m = tiny_verifiers[0]
    broken = dataclasses.replace(m, weights=m.weights.replace(final_norm=m.weights.final_norm * jnp.inf))
    cfg = VerifierConfig(model="llama", name="judge")
    with pytest.raises(CmeError, match="verifier 'judge' gave 3 non-finite"):
        compute_rewards(
            RewardConfig(verifiers=(cfg,)),
            RewardBatch(PROMPTS, RESPONSES),
            verifiers=[Verifier.from_model(cfg, broken)],
        )


# ----------------------------------------------------------------------------------------------------------
# Device reward (the fused train step) against compute_rewards


G = 4
STOPS = np.array([2, *range(40, 70)], np.int32)  # many stop ids: a random policy stops early and sometimes at once


@pytest.fixture(scope="module")
def sampled(tiny_verifiers):
    """(policy prompt ids [P, C] and mask, Rollout) of the tiny llama policy, G samples per prompt."""
    from cme_jax.sampling import SamplingConfig, sample_jit
    from cme_jax.tokens import bucket_length, encode_prompts, left_pad

    policy = tiny_verifiers[0]
    ids = encode_prompts(policy.tokenizer, PROMPTS)
    ptoks, pmask = left_pad(ids, bucket_length(max(map(len, ids))), 0)
    scfg = SamplingConfig(max_new_tokens=10, temperature=1.0, num_samples=G)
    ro = sample_jit(policy.weights, policy.cfg, ptoks, pmask, jax.random.key(3), scfg, STOPS, 0)
    return ptoks, pmask, ro


def device_inputs(ptoks, pmask):
    return jnp.repeat(ptoks, G, axis=0), jnp.repeat(pmask, G, axis=0)


def all_terms_config(zscore: bool) -> RewardConfig:
    return RewardConfig(
        terms=(
            ("cme", 1.5),
            ("self_certainty", 0.3),
            ("neg_entropy", 0.2),
            ("self_loglik", 0.1),
            ("length", 0.01),
            ("random", 0.05),
        ),
        verifiers=(
            VerifierConfig(model="qwen3", name="a", weight=0.7, score_eos=True, contrastive=True),
            VerifierConfig(model="llama", name="b", weight=-0.4, context="plain", max_length=6),
        ),
        zscore=zscore,
        repetition_penalty=0.2,
        repetition_ngram=2,
        length_penalty=0.01,
        length_penalty_start=3,
        empty_reward=-5.0,
    )


def loaded_verifiers(rc, tiny_verifiers):
    by_name = {"llama": tiny_verifiers[0], "qwen3": tiny_verifiers[1]}
    return [Verifier.from_model(vc, by_name[vc.model]) for vc in rc.verifiers]


@pytest.mark.parametrize("zscore", [False, True])
def test_device_reward_equals_compute_rewards_on_a_sampled_rollout(tiny_verifiers, sampled, zscore):
    policy = tiny_verifiers[0]
    ptoks, pmask, ro = sampled
    stopped, lengths = np.asarray(ro.stopped), np.asarray(ro.lengths)
    content = [t[: n - s] for t, n, s in zip(np.asarray(ro.tokens), lengths, stopped)]
    # The rollout covers the cases: stopped, truncated, an empty response, special ids inside a response.
    assert stopped.any() and not stopped.all() and any(len(c) == 0 for c in content)
    assert any(set(c.tolist()) & {0, 1, 2} for c in content)

    rc = all_terms_config(zscore)
    vs = loaded_verifiers(rc, tiny_verifiers)
    rng = jax.random.key(7)
    host = compute_rewards(
        rc, RewardBatch.from_rollout(PROMPTS, ro, ptoks, pmask, policy.tokenizer), verifiers=vs, policy=policy, rng=rng
    )
    dr = device_reward_fn(rc, vs, policy.cfg, policy.tokenizer, G)
    rewards, metrics = jax.jit(dr.fn)(policy.weights, ro, *device_inputs(ptoks, pmask), dr.frozen(PROMPTS, rng))
    assert rewards.dtype == jnp.float32 and rewards.shape == (len(PROMPTS) * G,)
    np.testing.assert_allclose(np.asarray(rewards), host.rewards, atol=1e-5, rtol=0)
    assert set(host.diagnostics) <= set(metrics)
    for k, v in host.diagnostics.items():
        assert float(metrics[k]) == pytest.approx(v, abs=1e-5), k
    assert {f"{k}/nonfinite" for k in host.components if k != "length"} <= set(metrics)
    dr.check(metrics)


def rollout_from_ids(rows: list[list[int]], stopped: list[bool], width: int):
    """A Rollout built by hand: each row's ids (the stop token last when stopped), right-padded."""
    from cme_jax.sampling import Rollout

    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    stopped = np.asarray(stopped)
    return Rollout(
        tokens=jnp.asarray(tokens),
        mask=jnp.asarray(mask),
        logprobs=jnp.zeros(tokens.shape, jnp.float32),
        lengths=jnp.asarray(mask.sum(1), jnp.int32),
        stopped=jnp.asarray(stopped),
        truncated=jnp.asarray(~stopped),
    )


def test_device_reward_equals_the_text_path_for_canonical_ids(tiny_verifiers):
    """Responses as the tokenizer writes them (plus special ids that decoding drops): device == re-tokenized text."""
    policy = tiny_verifiers[0]
    tok = policy.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    texts = ["one two three four five", " the lazy dog", "", "hello world, this is"]
    rows = [[*enc(texts[0]), 2], [*enc(texts[1])[:1], 1, *enc(texts[1])[1:]], [1, 0, 2], enc(texts[3])]
    stopped = [True, False, True, False]
    ro = rollout_from_ids(rows, stopped, 12)
    assert [tok.decode(r, skip_special_tokens=True) for r in rows] == texts
    from cme_jax.tokens import encode_prompts, left_pad

    ptoks, pmask = left_pad(encode_prompts(tok, PROMPTS), 32, 0)
    # No zscore here: a random tiny model's contrastive scores are nearly equal within a group, and z-scoring
    # would blow float noise from the two paths' different padding up to 1e-3 (the sampled test covers zscore).
    rc = RewardConfig(
        terms=("cme",),
        verifiers=(
            VerifierConfig(model="qwen3", name="a", weight=0.5, score_eos=True, contrastive=True, max_length=4),
            VerifierConfig(model="llama", name="b", weight=2.0, context="plain", template="Q: {prompt}\nA:"),
        ),
        repetition_penalty=0.5,
        repetition_ngram=2,
        empty_reward=-4.0,
    )
    G2 = 2
    vs = loaded_verifiers(rc, tiny_verifiers)
    batch = RewardBatch(PROMPTS, texts, np.asarray(stopped), ~np.asarray(stopped), ro.tokens, ro.mask)
    text = compute_rewards(rc, batch, verifiers=vs)  # no policy: re-tokenized text
    dr = device_reward_fn(rc, vs, policy.cfg, tok, G2)
    rewards, metrics = jax.jit(dr.fn)(
        policy.weights, ro, jnp.repeat(ptoks, G2, 0), jnp.repeat(pmask, G2, 0), dr.frozen(PROMPTS, None)
    )
    np.testing.assert_allclose(np.asarray(rewards), text.rewards, atol=1e-5, rtol=0)
    assert text.empty.tolist() == [False, False, True, False] and float(metrics["response/empty"]) == 1.0
    assert float(metrics["cme/a/truncated"]) == text.diagnostics["cme/a/truncated"] >= 1
    for k, v in text.diagnostics.items():
        assert float(metrics[k]) == pytest.approx(v, abs=1e-5), k


def test_sharded_device_reward_equals_single_device(tiny_verifiers, sampled):
    from cme_jax.models.sharding import batch_sharding, make_mesh, weight_shardings

    policy = tiny_verifiers[0]
    ptoks, pmask, ro = sampled
    rc = all_terms_config(zscore=False)
    dr = device_reward_fn(rc, loaded_verifiers(rc, tiny_verifiers), policy.cfg, policy.tokenizer, G)
    frozen = dr.frozen(PROMPTS, jax.random.key(7))
    want, _ = jax.jit(dr.fn)(policy.weights, ro, *device_inputs(ptoks, pmask), frozen)

    mesh = make_mesh(data=2, fsdp=1, tensor=2)
    rows = batch_sharding(mesh, 1)
    shardings = (weight_shardings(policy.cfg, mesh), rows, rows, rows, dr.frozen_shardings(mesh))
    args = jax.device_put((policy.weights, ro, *device_inputs(ptoks, pmask), frozen), shardings)
    got, _ = jax.jit(dr.fn, in_shardings=shardings)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert args[-1]["verifiers"][0]["context"].sharding.spec[0] == "data"


def test_device_reward_needs_a_shared_vocabulary(tiny_verifiers):
    import dataclasses

    policy = tiny_verifiers[0]
    other = dataclasses.replace(tiny_verifiers[1], tokenizer=tiny_tokenizer(vocab=300))
    vc = VerifierConfig(model="other", name="o")
    rc = RewardConfig(verifiers=(vc,))
    assert device_reward_fn(rc, [Verifier.from_model(vc, other)], policy.cfg, policy.tokenizer, G) is None
    baselines = device_reward_fn(RewardConfig(terms=("self_loglik",)), [], policy.cfg, policy.tokenizer, G)
    assert baselines is not None and baselines.frozen(PROMPTS)["verifiers"] == ()
    with pytest.raises(CmeError, match="zscore needs groups of at least 2"):
        device_reward_fn(RewardConfig(terms=("length",), zscore=True), [], policy.cfg, policy.tokenizer, 1)


def test_device_reward_takes_weights_as_arguments_and_flags_non_finite_scores(tiny_verifiers, sampled):
    policy, vmodel = tiny_verifiers
    ptoks, pmask, ro = sampled
    vc = VerifierConfig(model="qwen3", name="judge")
    v = Verifier.from_model(vc, vmodel)
    dr = device_reward_fn(RewardConfig(verifiers=(vc,)), [v], policy.cfg, policy.tokenizer, G)
    fn = jax.jit(dr.fn)
    frozen = dr.frozen(PROMPTS)
    good, metrics = fn(policy.weights, ro, *device_inputs(ptoks, pmask), frozen)
    assert np.isfinite(np.asarray(good)).all() and float(metrics["cme/judge/nonfinite"]) == 0
    w = frozen["verifiers"][0]["weights"]
    frozen["verifiers"][0]["weights"] = w.replace(final_norm=w.final_norm * jnp.nan)
    bad, metrics = fn(policy.weights, ro, *device_inputs(ptoks, pmask), frozen)
    assert fn._cache_size() == 1  # same compiled function: the weights are an argument, not a constant
    # Never a NaN reward (nor advantage): the scores are zeroed and counted, and the step skips its update.
    assert np.isfinite(np.asarray(bad)).all() and float(metrics["cme/judge/nonfinite"]) > 0
    assert float(metrics["reward/nonfinite"]) == float(metrics["cme/judge/nonfinite"])
    with pytest.raises(CmeError, match=r"verifier 'judge' gave \d+ non-finite score\(s\) \(first at row 0: prompt 0"):
        dr.check(metrics)


# ----------------------------------------------------------------------------------------------------------
# One reward everywhere: training's two paths, score, audit and evaluate call the same combine


@pytest.fixture(scope="module")
def verifier_dirs(tmp_path_factory):
    """The two tiny verifiers as model directories (what the commands read), in the policy's vocabulary."""
    out = {}
    for family in ("llama", "qwen3"):
        path = tmp_path_factory.mktemp(f"dir_{family}")
        tiny_model(family, vocab_size=320).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        out[family] = str(path)
    return out


def test_commands_and_both_training_paths_give_one_reward(tiny_verifiers, verifier_dirs, sampled, tmp_path):
    import dataclasses
    import json

    import yaml

    from cme_jax import score
    from cme_jax.eval import evaluation as ev
    from cme_jax.eval.audit import combined_forms
    from cme_jax.rewards import text_inputs

    policy = tiny_verifiers[0]
    ptoks, pmask, ro = sampled
    # Both verifiers contrastive (the audit combines one form at a time), weights of both signs.
    cfgs = (
        VerifierConfig(model=verifier_dirs["qwen3"], name="a", weight=0.7, contrastive=True, score_eos=True),
        VerifierConfig(model=verifier_dirs["llama"], name="b", weight=-1.5, context="plain", contrastive=True),
    )
    vs = [Verifier.from_model(c, m) for c, m in zip(cfgs, tiny_verifiers[::-1])]
    batch = RewardBatch.from_rollout(PROMPTS, ro, ptoks, pmask, policy.tokenizer)
    rows = batch.row_prompts()
    guarded = RewardConfig(
        terms=(("cme", 2.0),), verifiers=cfgs, zscore=True, repetition_penalty=0.3, repetition_ngram=2
    )

    # Training: the host path (ids on device for a shared vocabulary) and the fused device path, with the guard.
    host = compute_rewards(guarded, batch, verifiers=vs, policy=policy)
    dr = device_reward_fn(guarded, vs, policy.cfg, policy.tokenizer, G)
    device, _ = jax.jit(dr.fn)(policy.weights, ro, *device_inputs(ptoks, pmask), dr.frozen(PROMPTS))
    np.testing.assert_allclose(np.asarray(device), host.rewards, atol=1e-5, rtol=0)
    valid = ~host.empty
    assert valid.sum() >= 4

    # The audit's combination of the same rows as groups of G, z-scored: training's reward without the guard.
    zscored = dataclasses.replace(guarded, repetition_penalty=0.0)
    train_z = compute_rewards(zscored, batch, verifiers=vs).rewards  # the text path: re-tokenized responses
    x = text_inputs(vs, rows, batch.responses, batch.stopped, group_size=G, both_forms=True)
    x = x.replace(empty=np.asarray(host.empty))
    audit_z = combined_forms(list(cfgs), x, {"a": 2.0 * 0.7, "b": 2.0 * -1.5}, zscore=True)["contrastive"]
    np.testing.assert_allclose(audit_z[valid], train_z[valid], atol=1e-4, rtol=0)

    # score and evaluate read single responses (no groups): training's reward without z-scoring or the guard.
    plain = dataclasses.replace(zscored, zscore=False, empty_reward=-6.0)
    want = compute_rewards(plain, batch, verifiers=vs).rewards
    inp = tmp_path / "rows.jsonl"
    lines = [{"prompt": p, "response": r, "stopped": bool(s)} for p, r, s in zip(rows, batch.responses, batch.stopped)]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    conf = tmp_path / "reward.yaml"
    conf.write_text(yaml.safe_dump({"reward": {**config_dict(plain), "zscore": False}}))
    out = tmp_path / "scored.jsonl"
    score.main(["--input", str(inp), "--output", str(out), "--verifier-config", str(conf), "--no-progress"])
    scored = np.array([json.loads(line)["cme"] for line in out.read_text().splitlines()])
    np.testing.assert_allclose(scored, want, atol=1e-5, rtol=0)

    prompts = [ev.EvalPrompt(p) for p in rows]
    side = ev.SideOutputs(list(batch.responses), [bool(s) for s in batch.stopped], None, {}, reused=False)
    weighted = [dataclasses.replace(c, weight=2.0 * c.weight) for c in cfgs]
    _, per_prompt = ev.automatic_metrics(prompts, {"model": side, "baseline": side}, weighted, n_boot=10)
    got = np.array([r["model_cme"] if r["model_cme"] is not None else np.nan for r in per_prompt])
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=0)
    assert np.isnan(got[~valid]).all()


def config_dict(rcfg: RewardConfig) -> dict:
    """A RewardConfig as the YAML a user writes."""
    import dataclasses

    d = dataclasses.asdict(rcfg)
    d["terms"] = [[t["name"], t["weight"]] for t in d["terms"]]
    return d


def test_a_non_finite_score_fails_the_same_way_on_both_training_paths(tiny_verifiers, sampled):
    import dataclasses

    policy, vmodel = tiny_verifiers
    ptoks, pmask, ro = sampled
    broken = dataclasses.replace(vmodel, weights=vmodel.weights.replace(final_norm=vmodel.weights.final_norm * jnp.nan))
    vc = VerifierConfig(model="qwen3", name="judge")
    v = Verifier.from_model(vc, broken)
    rc = RewardConfig(verifiers=(vc,))
    with pytest.raises(CmeError) as host:
        compute_rewards(
            rc, RewardBatch.from_rollout(PROMPTS, ro, ptoks, pmask, policy.tokenizer), verifiers=[v], policy=policy
        )
    dr = device_reward_fn(rc, [v], policy.cfg, policy.tokenizer, G)
    rewards, metrics = jax.jit(dr.fn)(policy.weights, ro, *device_inputs(ptoks, pmask), dr.frozen(PROMPTS))
    assert np.isfinite(np.asarray(rewards)).all()
    with pytest.raises(CmeError) as device:
        dr.check(jax.device_get(metrics))
    assert str(host.value) == str(device.value)
    assert "verifier 'judge' gave" in str(host.value) and "(first at row 0: prompt 0, response 0)" in str(host.value)


def test_a_registered_term_reaches_both_training_paths(tiny_verifiers, sampled):
    """A new label-free signal is one registered function; both paths then reward it, through `combine`."""
    from cme_jax.rewards import REGISTRY, register

    policy = tiny_verifiers[0]
    ptoks, pmask, ro = sampled

    @register("short_and_sure", policy_stats=("self_loglik",), needs_tokens=True)
    def short_and_sure(reward_cfg, x):
        return x.policy["self_loglik"] - 0.01 * x.lengths

    try:
        rc = RewardConfig(terms=(("short_and_sure", 2.0),))
        assert rc.policy_stats == ("self_loglik",) and rc.needs_policy_tokens
        batch = RewardBatch.from_rollout(PROMPTS, ro, ptoks, pmask, policy.tokenizer)
        host = compute_rewards(rc, batch, policy=policy)
        tokens, mask = join_prompts(ptoks, pmask, ro.tokens, ro.mask)
        loglik = np.asarray(
            policy_response_stats(policy.weights, policy.cfg, tokens, mask, start=ptoks.shape[1])["self_loglik"]
        )
        lengths = np.asarray(ro.mask).sum(1) - np.asarray(ro.stopped)
        want = np.where(host.empty, rc.empty_reward, 2.0 * (loglik - 0.01 * lengths))
        np.testing.assert_allclose(host.rewards, want, atol=1e-5)
        dr = device_reward_fn(rc, [], policy.cfg, policy.tokenizer, G)
        device, metrics = jax.jit(dr.fn)(policy.weights, ro, *device_inputs(ptoks, pmask), dr.frozen(PROMPTS))
        np.testing.assert_allclose(np.asarray(device), want, atol=1e-5)
        assert "short_and_sure/mean" in metrics
    finally:
        REGISTRY.pop("short_and_sure")
    with pytest.raises(ValueError, match="'short_and_sure' is not allowed"):
        RewardConfig(terms=("short_and_sure",))
