"""The sampler against independent references: transformers' greedy generate, full-forward log-probs, numpy
softmax frequencies and filter sets, single-device runs; and the generate command line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from tiny_hf import hf_greedy, hf_logits, left_padded_batch, tiny_model, tiny_tokenizer

from cme_jax import sampling
from cme_jax.errors import CmeError
from cme_jax.models.logprobs import token_logprobs
from cme_jax.models.sharding import batch_sharding, make_mesh, weight_shardings
from cme_jax.sampling import (
    SamplingConfig,
    cache_stages,
    decode_responses,
    draw,
    generate_responses,
    prepare_decode,
    response_token_lists,
    sample_jit,
)
from cme_jax.sources import load_model
from cme_jax.tokens import bucket_length, encode_prompts, left_pad, stop_token_ids
from tests.helpers import assert_one_line_error, start_module

NO_STOP = np.asarray([], np.int32)
PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "one two", "answer the question"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, saved directory, cme_jax LoadedModel) of a small Llama with the tiny chat tokenizer.

    A larger initialisation than the default makes next-token distributions peaked (no near-ties for argmax)."""
    hf = tiny_model("llama", vocab_size=320, initializer_range=0.1)
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return hf, path, load_model(str(path))


def _prompt_batch(model, prompts=PROMPTS):
    ids = encode_prompts(model.tokenizer, prompts)
    return left_pad(ids, bucket_length(max(map(len, ids))), 0)


def _joined(toks, mask, ro, g):
    """Prompt rows repeated for their samples, followed by the responses."""
    t = np.concatenate([np.repeat(toks, g, axis=0), np.asarray(ro.tokens)], axis=1)
    m = np.concatenate([np.repeat(mask, g, axis=0), np.asarray(ro.mask)], axis=1)
    return t, m


# ----------------------------------------------------------------------------------------------------------
# The real model against transformers


@pytest.mark.slow
def test_greedy_48_tokens_identical_to_transformers_generate(smollm, hf_smollm):
    """One left-padded batch of prompts of different lengths on our side; transformers runs each prompt alone,
    so its own padding numerics play no part and every row is compared with an unpadded reference."""
    prompts = [
        "Hi!",
        "What is the capital of France?",
        "Write a haiku about autumn leaves falling into a quiet river at dusk.",
        "List three prime numbers and explain in one sentence each why they are prime, as simply as you can.",
    ]
    tok = smollm.tokenizer
    ids = encode_prompts(tok, prompts)
    assert len(set(map(len, ids))) == len(prompts)
    toks, mask = left_pad(ids, bucket_length(max(map(len, ids))), 0)
    stops = stop_token_ids(tok)
    scfg = SamplingConfig(max_new_tokens=48, temperature=0.0)
    ro = sample_jit(smollm.weights, smollm.cfg, toks, mask, jax.random.key(0), scfg, np.asarray(stops), 0)
    ours = np.asarray(ro.tokens)
    for r, prompt_ids in enumerate(ids):
        ref = hf_greedy(hf_smollm, prompt_ids, 48, stops)
        n = int(ro.lengths[r])
        assert ours[r, :n].tolist() == ref, prompts[r]
        assert bool(ro.stopped[r]) == (ref[-1] in stops)
        assert bool(ro.truncated[r]) == (len(ref) == 48 and ref[-1] not in stops)
    # The log-probs are those of the logits the sampler used (greedy: temperature 1).
    t, m = _joined(toks, mask, ro, 1)
    ref_lp = token_logprobs(smollm.weights, smollm.cfg, jnp.asarray(t), jnp.asarray(m), start=toks.shape[1])
    np.testing.assert_allclose(np.asarray(ro.logprobs), np.asarray(ref_lp), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Log-probs, distribution, filters, stop tokens


LAYOUTS = pytest.mark.parametrize("layout", ["per_layer", "stacked"])  # what CPUs / accelerators use by default


@LAYOUTS
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_logprobs_equal_full_forward_recompute(family, layout, tmp_path):
    """Log-probs returned by the sampler = token_logprobs of prompt + response at the same temperature,
    with a top-k filter on (filters shape the draw, not the reported distribution) and two samples per prompt."""
    hf = tiny_model(family)
    hf.save_pretrained(tmp_path)
    m = load_model(str(tmp_path), tokenizer=False)
    toks, mask = left_padded_batch(m.cfg.vocab_size, [9, 4, 12], 12, seed=7)
    scfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20, num_samples=2)
    ro = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(1), scfg, np.asarray([5, 6]), 0, layout)
    t, mk = _joined(toks, mask, ro, 2)
    ref = token_logprobs(m.weights, m.cfg, jnp.asarray(t), jnp.asarray(mk), start=12, temperature=0.7)
    got = np.asarray(ro.logprobs)
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-4, rtol=0)
    assert (got[~np.asarray(ro.mask)] == 0).all() and (got[np.asarray(ro.mask)] < 0).all()
    # Sliding-window layers (gemma3_text, window 5) are exercised: prompt + response exceed the window.
    assert t.shape[1] > 2 * 5


def test_cache_stages():
    """Short responses decode against one cache; longer ones grow it in up to four equal stages."""
    assert cache_stages(1) == [1] and cache_stages(40) == [40] and cache_stages(63) == [63]
    assert cache_stages(70) == [35, 70]
    assert cache_stages(128) == [32, 64, 96, 128]
    assert cache_stages(1001) == [250, 500, 750, 1001]


@LAYOUTS
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_growing_cache_equals_one_cache(family, layout, tmp_path, monkeypatch):
    """70 new tokens decode in two cache stages: the same tokens and log-probs as one full-length cache, and
    log-probs equal to a full forward over prompt + response. 51 rows take the CPU's row-major decode products."""
    hf = tiny_model(family)
    hf.save_pretrained(tmp_path)
    m = load_model(str(tmp_path), tokenizer=False)
    toks, mask = left_padded_batch(m.cfg.vocab_size, [9, 4, 12], 12, seed=3)
    scfg = SamplingConfig(max_new_tokens=70, temperature=0.9, num_samples=17)
    static = ("cfg", "scfg", "pad_id", "layout")
    run = lambda: jax.jit(sampling.sample, static_argnames=static)(
        m.weights, m.cfg, toks, mask, jax.random.key(2), scfg, NO_STOP, 0, layout
    )
    staged = run()
    monkeypatch.setattr(sampling, "_CACHE_STAGES", 1)
    single = run()
    np.testing.assert_array_equal(np.asarray(staged.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(staged.logprobs), np.asarray(single.logprobs), atol=1e-5, rtol=0)
    t, mk = _joined(toks, mask, staged, 17)
    ref = token_logprobs(m.weights, m.cfg, jnp.asarray(t), jnp.asarray(mk), start=12, temperature=0.9)
    np.testing.assert_allclose(np.asarray(staged.logprobs), np.asarray(ref), atol=1e-4, rtol=0)
    assert np.asarray(staged.mask).all()


def test_first_token_frequencies_match_softmax(tiny):
    """4000 draws of the first response token of one prompt against softmax(logits / T) from transformers."""
    hf, _, m = tiny
    toks, mask = _prompt_batch(m, PROMPTS[:1])
    temp, n = 0.25, 4000
    scfg = SamplingConfig(max_new_tokens=1, temperature=temp, num_samples=n)
    ro = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(11), scfg, NO_STOP, 0)
    logits = hf_logits(hf, toks, mask)[0, -1].astype(np.float64) / temp
    p = np.exp(logits - logits.max())
    p /= p.sum()
    counts = np.bincount(np.asarray(ro.tokens)[:, 0], minlength=len(p))
    assert (counts > 0).sum() > 10  # a spread distribution, not a near-greedy one
    _chi_square_ok(counts, p * n)


def _chi_square_ok(counts: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> None:
    """Pearson's test with bins expecting fewer than min_expected draws merged into one."""
    assert counts[expected == 0].sum() == 0
    small = expected < min_expected
    obs, exp = counts[~small], expected[~small]
    if expected[small].sum() > 0:
        obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
    p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert p_value > 1e-3, p_value


def test_draw_frequencies_match_across_vocabulary_blocks():
    """The two-level inverse-CDF draw on hand-made logits spanning many blocks, with tiny and zero masses."""
    rng = np.random.default_rng(0)
    V, n = 1000, 20000  # not a multiple of the 256-entry block
    rows = [rng.normal(0, 3, V), np.where(np.arange(V) % 97 == 0, 5.0, -np.inf), np.linspace(-20, 0, V)]
    logits = np.repeat(np.stack(rows).astype(np.float32), n, axis=0)
    u = jax.random.uniform(jax.random.key(3), (len(logits),))
    tok, lp = jax.jit(lambda x, u: draw(x, u, SamplingConfig(temperature=1.0)))(jnp.asarray(logits), u)
    tok, lp = np.asarray(tok).reshape(len(rows), n), np.asarray(lp).reshape(len(rows), n)
    for i, z in enumerate(rows):
        p = np.exp(z - z.max())
        p /= p.sum()
        _chi_square_ok(np.bincount(tok[i], minlength=V), p * n)
        np.testing.assert_allclose(lp[i], np.log(p[tok[i]]), atol=1e-4)


def _allowed(logits_V: np.ndarray, scfg: SamplingConfig, tol: float = 1e-5) -> np.ndarray:
    """Tokens top-k, then top-p (renormalised after top-k), then min-p keep, computed in float64 with numpy.

    The tolerance widens each boundary slightly so float32 rounding on our side cannot flip a borderline token."""
    s = logits_V.astype(np.float64) / scfg.temperature
    p = np.exp(s - s.max())
    p /= p.sum()
    keep = np.ones(len(s), bool)
    if scfg.top_k:
        keep &= s >= np.sort(s)[-scfg.top_k] - tol
    if scfg.top_p < 1:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        order = np.argsort(-q, kind="stable")
        desc = q[order]
        above = np.cumsum(desc) - desc  # mass of the tokens before j in descending order
        # Ties share the mass strictly above the tied value.
        first = np.searchsorted(-desc, -desc, side="left")
        above_strict = np.empty_like(q)
        above_strict[order] = above[first]
        keep &= above_strict < scfg.top_p + tol
    if scfg.min_p:
        keep &= p >= scfg.min_p * p.max() * (1 - tol)
    return keep


@pytest.mark.parametrize(
    "scfg",
    [
        SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=5, num_samples=64),
        SamplingConfig(max_new_tokens=6, temperature=0.8, top_p=0.6, num_samples=64),
        SamplingConfig(max_new_tokens=6, temperature=0.8, min_p=0.3, num_samples=64),
        SamplingConfig(max_new_tokens=6, temperature=1.3, top_k=40, top_p=0.9, min_p=0.05, num_samples=64),
    ],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_filters_never_emit_a_removed_token(tiny, scfg):
    """Every sampled token (all steps) lies in the allowed set computed from transformers' logits."""
    hf, _, m = tiny
    toks, mask = _prompt_batch(m)
    ro = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(5), scfg, NO_STOP, 0)
    t, mk = _joined(toks, mask, ro, scfg.num_samples)
    logits = hf_logits(hf, t, mk)
    P, N = toks.shape[1], scfg.max_new_tokens
    sizes = []
    for r in range(t.shape[0]):
        for i in range(N):
            allowed = _allowed(logits[r, P + i - 1], scfg)
            sizes.append(allowed.sum())
            assert allowed[t[r, P + i]], (r, i)
    assert np.mean(sizes) < 0.5 * m.cfg.vocab_size  # the filters removed something
    assert len(np.unique(t[:, P:])) > 10  # and sampling still spreads over the kept tokens
    again = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(5), scfg, NO_STOP, 0)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(ro.tokens))  # deterministic per key


@LAYOUTS
def test_stop_tokens_end_rows_independently(tiny, layout):
    """Rows end at their own first stop token, are masked after it, and rows without one are truncated."""
    _, _, m = tiny
    toks, mask = _prompt_batch(m)
    N = 12
    greedy = SamplingConfig(N, temperature=0.0)
    free = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(0), greedy, NO_STOP, 0, layout)
    ref = np.asarray(free.tokens)
    assert np.asarray(free.truncated).all() and (np.asarray(free.lengths) == N).all()
    # A stop set that ends some rows at different steps and leaves at least one row running to N.
    stops = _pick_stops(ref)
    ro = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(0), greedy, stops, 0, layout)
    ends = []
    for r in range(len(ref)):
        hits = np.flatnonzero(np.isin(ref[r], stops))
        n = hits[0] + 1 if len(hits) else N
        ends.append(n)
        assert int(ro.lengths[r]) == n
        assert bool(ro.stopped[r]) == bool(len(hits)) and bool(ro.truncated[r]) == (not len(hits))
        np.testing.assert_array_equal(np.asarray(ro.tokens[r, :n]), ref[r, :n])
        assert (np.asarray(ro.tokens[r, n:]) == 0).all() and not np.asarray(ro.mask[r, n:]).any()
        assert np.asarray(ro.mask[r, :n]).all() and (np.asarray(ro.logprobs[r, n:]) == 0).all()
        assert response_token_lists(ro)[r] == ref[r, : n - 1 if len(hits) else n].tolist()
    assert len(set(ends)) >= 3 and N in ends
    assert decode_responses(m.tokenizer, ro)[0] == m.tokenizer.decode(response_token_lists(ro)[0])
    # A decode copy of the weights built once (as `generate` passes it) gives the same rollout.
    prepared = prepare_decode(m.weights, m.cfg, layout)
    assert (prepared is None) == (layout == "stacked")
    again = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(0), greedy, stops, 0, decode_weights=prepared)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(ro.tokens))
    np.testing.assert_allclose(np.asarray(again.logprobs), np.asarray(ro.logprobs), atol=1e-6)


def _pick_stops(ref: np.ndarray) -> np.ndarray:
    """Two tokens whose first occurrences end rows at distinct steps while some row never meets either."""
    for a in np.unique(ref):
        for b in np.unique(ref):
            stops = np.asarray([a, b], np.int32)
            firsts = [np.flatnonzero(np.isin(row, stops)) for row in ref]
            ends = {f[0] for f in firsts if len(f)}
            if len(ends) >= 2 and min(ends) > 0 and any(len(f) == 0 for f in firsts):
                return stops
    raise AssertionError("no suitable stop set in the reference tokens")


@pytest.mark.parametrize(
    ("sizes", "layout"),
    [
        # Rows over data x fsdp and weights over fsdp x tensor at once need all three axes: 8 devices.
        pytest.param((2, 2, 2), "per_layer", marks=pytest.mark.devices(8), id="data2_fsdp2_tensor2"),
        pytest.param((4, 1, 1), "stacked", id="data4"),
    ],
)
def test_sharded_greedy_equals_single_device(tiny, sizes, layout):
    """Weights placed by their rules and prompt rows over the data axes give the single-device greedy tokens."""
    _, _, m = tiny
    prompts = PROMPTS + [p + " again" for p in PROMPTS]
    toks, mask = _prompt_batch(m, prompts)
    scfg = SamplingConfig(max_new_tokens=10, temperature=0.0, num_samples=2)
    stops = np.asarray(stop_token_ids(m.tokenizer), np.int32)
    one = sample_jit(m.weights, m.cfg, toks, mask, jax.random.key(0), scfg, stops, 0, layout)
    mesh = make_mesh(*sizes)
    weights = jax.device_put(m.weights, weight_shardings(m.cfg, mesh))
    rows = batch_sharding(mesh, 2)
    toks, mask = jax.device_put(toks, rows), jax.device_put(mask, rows)
    many = sample_jit(weights, m.cfg, toks, mask, jax.random.key(0), scfg, stops, 0, layout)
    np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(many.lengths), np.asarray(one.lengths))
    np.testing.assert_allclose(np.asarray(many.logprobs), np.asarray(one.logprobs), atol=1e-5)
    # Rows stay split over the batch axes (data x fsdp), not replicated.
    rows_per_shard = many.tokens.sharding.shard_shape(many.tokens.shape)[0]
    assert rows_per_shard == len(prompts) * 2 // (sizes[0] * sizes[1])


# ----------------------------------------------------------------------------------------------------------
# generate_responses and the command line


def test_generate_responses_groups_samples_per_prompt(tiny, capsys):
    _, _, m = tiny
    prompts = ["one two", "hello world, this is a small corpus", "answer"]
    scfg = SamplingConfig(max_new_tokens=5, temperature=1.0, num_samples=3)
    res = generate_responses(m, prompts, scfg, seed=1, batch_size=2, progress=True)
    assert [len(r) for r in res] == [3, 3, 3]
    for samples in res:
        for s in samples:
            assert s["response"] == m.tokenizer.decode(s["tokens"], skip_special_tokens=True)
            assert 1 <= len(s["tokens"]) + s["stopped"] <= 5 and s["logprob"] < 0
    assert res == generate_responses(m, prompts, scfg, seed=1, batch_size=2)
    err = capsys.readouterr().err
    assert "batch 2/2" in err and "tok/s" in err
    with pytest.raises(CmeError, match="no prompts"):
        generate_responses(m, [], scfg)


def test_generate_responses_on_a_mesh(tiny):
    """Prompt rows split over data x fsdp (the batch rounded up to whole rows per device) give the same text."""
    _, _, m = tiny
    mesh = make_mesh(data=2, fsdp=2)
    sharded = load_model(str(m.spec), mesh=mesh)
    prompts = PROMPTS[:3]  # 3 rows: padded to 4 on the mesh
    scfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    got = generate_responses(sharded, prompts, scfg, mesh=mesh)
    want = generate_responses(m, prompts, scfg)
    strip = lambda res: [[{k: v for k, v in s.items() if k != "logprob"} for s in r] for r in res]
    assert strip(got) == strip(want)
    np.testing.assert_allclose([r[0]["logprob"] for r in got], [r[0]["logprob"] for r in want], atol=1e-4)


def test_cli_bad_inputs_are_one_line_and_exit_2(tiny, tmp_path):
    _, path, _ = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    model = ["--model", str(path), "--max-new-tokens", "8"]  # the tiny model has a 256-token context
    cases = {
        "no prompts": [*model, "--prompts", str(empty)],
        "too long": [*model, "--prompt", "one two three " * 200],
        "top_p": [*model, "--prompt", "hi", "--top-p", "0"],
        "top_p above 1": [*model, "--prompt", "hi", "--top-p", "1.5"],
        "temperature": [*model, "--prompt", "hi", "--temperature", "-0.5"],
        "max_new_tokens": [*model, "--prompt", "hi", "--max-new-tokens", "0"],  # the last value wins
        "stop string": [*model, "--prompt", "hi", "--stop", "hello world"],
        "missing model": ["--model", str(tmp_path / "nope"), "--prompt", "hi"],
    }
    expect = {
        "no prompts": "holds no prompts",
        "too long": "--truncate-left",
        "top_p": "top_p",
        "top_p above 1": "top_p",
        "temperature": "temperature",
        "max_new_tokens": "max_new_tokens",
        "stop string": "one token",
        "missing model": "nope",
    }
    procs = {name: start_module("cme_jax.generate", *args) for name, args in cases.items()}  # in parallel
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert_one_line_error(proc.returncode, err, expect[name])


def test_cli_jsonl_round_trip(tiny, tmp_path):
    _, path, m = tiny
    rows = [{"prompt": "hello world", "id": "a"}, {"prompt": "one two three four five six seven", "id": "b"}]
    rows.append({"instruction": "answer the question", "id": "c"})
    rows.append({"prompt": "one two three " * 200, "id": "long"})  # over the context: cut from the left on request
    src, out = tmp_path / "in.jsonl", tmp_path / "out" / "responses.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--num-samples", "2", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50", "--max-new-tokens", "6"]
    seeded = ["--model", str(path), "--seed", "3", *args]
    proc = start_module("cme_jax.generate", *seeded, "--prompts", str(src), "--output", str(out), "--truncate-left")
    one = start_module("cme_jax.generate", *seeded, "--prompt", "hello world", "--output", "-")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "batch 1/1" in err and "wrote 8 responses" in err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["id"], g["sample"]) for g in got] == [(r["id"], s) for r in rows for s in range(2)]
    assert all(g["logprob"] < 0 and 1 <= g["num_tokens"] <= 6 for g in got)
    # '--output -' writes the same kind of rows to stdout, and nothing else.
    one_out, one_err = one.communicate(timeout=300)
    assert one.returncode == 0, one_err
    stdout_rows = [json.loads(line) for line in one_out.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in stdout_rows] == [("hello world", 0), ("hello world", 1)]
    # The command line gives what the library gives for the same settings.
    prompts = [r.get("prompt", r.get("instruction")) for r in rows]
    scfg = SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=50, num_samples=2)
    lib = generate_responses(m, prompts, scfg, seed=3, truncate_left=True)
    assert [g["response"] for g in got] == [s["response"] for samples in lib for s in samples]
    assert all(g["prompt"] == p for g, p in zip(got, [p for p in prompts for _ in range(2)]))
