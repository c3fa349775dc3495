"""Served verifiers against a real HTTP server on 127.0.0.1 that speaks vLLM's completions schema.

The server (tests/vllm_server.py) computes prompt log-probs with cme_jax's own model code; the reference for
every served score is the same verifier scored locally (`score_texts`), which tests/test_scoring.py checks
against transformers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np
import pytest

from cme_jax import train as train_mod
from cme_jax.cli import read_reward_file
from cme_jax.config import config_yaml, load_config
from cme_jax.endpoints import Transient
from cme_jax.errors import CmeError
from cme_jax.eval.audit import form_scores, score_forms
from cme_jax.remote import cache_path, response_sums
from cme_jax.rewards import RewardBatch, RewardConfig, compute_rewards, device_reward_fn
from cme_jax.score import main as score_main
from cme_jax.scoring import Verifier, VerifierConfig, load_verifier, score_texts
from cme_jax.sources import load_model
from tests.helpers import no_proxy
from tests.train_helpers import ROOT, metric_rows, tiny_config, write_config
from tests.vllm_server import Faults, VllmLikeServer

SECRET = "sk-served-verifier-9f3c"
LOCAL_FIELDS = ("model", "name", "weight", "context", "template", "score_eos", "max_length", "contrastive")

# (prompt, response, stopped): a duplicate row, an empty response, special-token text, one cut by max_length.
ROWS = [
    ("What is the capital of France?", "The capital of France is Paris.", True),
    (
        "What is the capital of France?",
        "Paris, of course: the capital and largest city of France, on the Seine.",
        False,
    ),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town", True),
    ("Explain photosynthesis in one sentence.", "Plants turn light, water and carbon dioxide into sugar.", True),
    ("Explain photosynthesis in one sentence.", "", True),
    ("Say hi.", "Hi <|im_end|> there", True),
    ("What is the capital of France?", "The capital of France is Paris.", True),
]
TINY_ROWS = [
    ("the quick brown fox", "jumps over the lazy dog", True),
    ("say hello to the world", "hello world, this is small", False),
    ("answer the question", "one two three four five", True),
    ("count from one to five", "", True),
    ("a small corpus", "seven eight nine ten", True),
    ("the quick brown fox", "jumps over the lazy dog", True),
    ("write one clear sentence", "a short and clear sentence", True),
    ("seven eight nine ten", "the lazy dog", True),
]


def columns(rows):
    return [r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows])


@pytest.fixture(scope="module")
def vllm():
    """One server for the whole module; tests register the models it serves and switch its faults."""
    server = VllmLikeServer()
    yield server
    server.close()


@pytest.fixture
def server(vllm, monkeypatch):
    no_proxy(monkeypatch)
    vllm.reset()
    vllm.api_key = None
    yield vllm
    vllm.reset()
    vllm.api_key = None


@pytest.fixture(scope="module")
def tiny(tiny_models, vllm):
    """The tiny verifier with another vocabulary than the tiny policy, served as 'tiny'."""
    model = load_model(tiny_models["other_vocab"])
    vllm.models["tiny"] = model
    return tiny_models["other_vocab"], model


def served_config(spec: str, server: VllmLikeServer, tmp_path: Path, **kw) -> VerifierConfig:
    kw = {"server_model": "tiny", "cache": str(tmp_path / "cache"), "context": "chat", **kw}
    return VerifierConfig(model=spec, url=server.url, **kw)


def load_served(cfg: VerifierConfig) -> Verifier:
    v = load_verifier(cfg)
    v.remote.endpoint.backoff = 0.001  # retries at once: the tests wait for nothing
    return v


def local_twin(cfg: VerifierConfig, model) -> Verifier:
    """The same verifier scored on this machine."""
    return Verifier.from_model(VerifierConfig(**{k: getattr(cfg, k) for k in LOCAL_FIELDS}), model)


def sent_rows(verifier: Verifier, rows) -> list[list[int]]:
    """The token ids the local text path scores for these rows (contexts and responses, empty ones left out)."""
    out = []
    contexts = [verifier.context_ids(p) for p, _, _ in rows]
    if verifier.config.contrastive:
        contexts += [verifier.context_ids("")] * len(rows)
    for ctx, (_, text, stopped) in zip(contexts, rows * 2):
        ids, _ = verifier.response_ids(text, stopped)
        if ids:
            out.append([*ctx, *ids])
    return out


def assert_same_scores(got, want):
    # Rows that count (a reward, a filter) agree to 1e-5. An empty response's score is its end token's log-prob
    # alone, often a rare token whose float32 log-prob moves by a few 1e-5 with the padding layout; no consumer
    # uses it (empty rows get empty_reward).
    valid = ~want.empty
    np.testing.assert_allclose(got.mean[valid], want.mean[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.mean, want.mean, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_array_equal(got.empty, want.empty)
    np.testing.assert_array_equal(got.truncated, want.truncated)


# ----------------------------------------------------------------------------------------------------------
# Reading a reply


def _entry(token: int, logprob: float) -> dict:
    return {str(token): {"logprob": logprob, "rank": 1, "decoded_token": "x"}}


def test_response_sums_reads_the_response_positions_of_each_choice():
    rows, starts = [[5, 6, 7, 8], [9, 10, 11]], [2, 1]
    reply = {  # choices out of order: matched by index
        "choices": [
            {"index": 1, "prompt_logprobs": [None, _entry(10, -0.5), _entry(11, -3.5)]},
            {"index": 0, "prompt_logprobs": [None, _entry(6, -9.0), _entry(7, -1.25), _entry(8, -0.75)]},
        ]
    }
    assert response_sums(reply, rows, starts, "v") == [-2.0, -4.0]
    # vLLM's stand-in for -inf comes back as -inf, so the caller reports a non-finite score as for a local model
    reply["choices"][0]["prompt_logprobs"][2] = _entry(11, -9999.0)
    assert response_sums(reply, rows, starts, "v")[1] == -np.inf
    with pytest.raises(Transient):  # a gateway's page instead of a completion: asked again
        response_sums({"detail": "bad gateway"}, rows, starts, "v")
    with pytest.raises(CmeError, match="answered 1 choices for 2 prompts"):
        response_sums({"choices": reply["choices"][:1]}, rows, starts, "v")
    with pytest.raises(CmeError, match="no prompt_logprobs"):
        response_sums({"choices": [{"index": 0}, {"index": 1}]}, rows, starts, "v")
    with pytest.raises(CmeError, match="3 prompt log-probs for a prompt of 4 tokens"):
        response_sums({"choices": [reply["choices"][0], reply["choices"][0] | {"index": 0}]}, rows, starts, "v")


# ----------------------------------------------------------------------------------------------------------
# Served CME equals local CME on the embedded models


REAL_CASES = {
    "smollm-chat": ("smollm", "smollm2-135m-instruct", dict(context="chat", score_eos=True, max_length=12)),
    "smollm-plain-contrastive": (
        "smollm",
        "smollm2-135m-instruct",
        dict(context="plain", template="Q: {prompt}\nA:", contrastive=True),
    ),
    "gemma-plain": ("gemma", "gemma3-270m", dict(context="plain", template="Question: {prompt}\nAnswer:")),
    "gemma-plain-contrastive-eos": (
        "gemma",
        "gemma3-270m",
        dict(context="plain", template="Question: {prompt}\nAnswer:", contrastive=True, score_eos=True, max_length=12),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL_CASES))
def test_served_cme_equals_local_cme_on_embedded_models(case, server, tmp_path, request):
    fixture, alias, settings = REAL_CASES[case]
    model = request.getfixturevalue(fixture)
    server.models[alias] = model
    cfg = served_config(alias, server, tmp_path, server_model=alias, request_rows=2, **settings)
    local = local_twin(cfg, model)
    prompts, responses, stopped = columns(ROWS)
    want = score_texts(local, prompts, responses, stopped)
    got = score_texts(load_served(cfg), prompts, responses, stopped)
    assert_same_scores(got, want)
    assert want.empty.any() and np.isfinite(want.mean).all()
    if settings.get("max_length") == 12:
        assert want.truncated.any()
    # exactly the ids of the local text path went out, each distinct row once
    expected = sent_rows(local, ROWS)
    assert sorted(server.scored_rows) == sorted(map(list, {tuple(r) for r in expected}))
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 and b["prompt_logprobs"] == 0 for b in server.bodies)


# ----------------------------------------------------------------------------------------------------------
# Failures, retries, the cache, concurrency


@pytest.mark.parametrize("fault", ["flaky", "slow"])
def test_retries_recover_from_failed_and_delayed_requests(fault, server, tiny, tmp_path, caplog):
    spec, model = tiny
    caplog.set_level(logging.WARNING)
    cfg = served_config(spec, server, tmp_path, request_rows=2, concurrency=4, timeout=0.5, retries=3, cache=None)
    prompts, responses, stopped = columns(TINY_ROWS)
    healthy = score_texts(load_served(dataclasses.replace(cfg, timeout=300.0)), prompts, responses, stopped)
    assert_same_scores(healthy, score_texts(local_twin(cfg, model), prompts, responses, stopped))
    server.reset()  # the server has compiled these shapes: only the faults can make a request slow now
    server.faults = Faults(flaky=True) if fault == "flaky" else Faults(delay_first=2.0)
    assert_same_scores(score_texts(load_served(cfg), prompts, responses, stopped), healthy)
    failures = {0, 429, 503} if fault == "flaky" else {-1}
    assert failures <= set(server.statuses) and 200 in server.statuses
    assert any("retry" in m for m in caplog.messages)
    assert len(server.scored_rows) == len({tuple(r) for r in server.scored_rows}) == 6  # no row answered twice


def test_client_errors_are_one_line_and_not_retried(server, tiny, tmp_path):
    spec, _ = tiny
    prompts, responses, stopped = columns(TINY_ROWS)
    v = load_served(served_config(spec, server, tmp_path, server_model="no-such-model", concurrency=1, cache=None))
    with pytest.raises(CmeError, match=r"answered HTTP 404: .*`no-such-model` does not exist") as e:
        score_texts(v, prompts, responses, stopped)
    assert "\n" not in str(e.value) and "verifier 'other_vocab'" in str(e.value)
    assert server.statuses == [404]  # a 4xx is an answer, not a failure to retry
    server.reset()
    v = load_served(served_config(spec, server, tmp_path, cache=None))
    with pytest.raises(CmeError, match=r"HTTP 400: .*maximum context length") as e:
        score_texts(v, ["hi"], ["one two three four " * 200])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "mode, message",
    [("echo", "read other token ids than were sent"), ("keys", "gives no log-prob for token .* at position")],
)
def test_reply_for_other_token_ids_is_one_line(mode, message, server, tiny, tmp_path):
    spec, _ = tiny
    server.faults = Faults(wrong_ids=mode)
    prompts, responses, stopped = columns(TINY_ROWS)
    v = load_served(served_config(spec, server, tmp_path, cache=str(tmp_path / "c")))
    with pytest.raises(CmeError, match=message) as e:
        score_texts(v, prompts, responses, stopped)
    assert "\n" not in str(e.value)
    assert server.attempts and all(n == 1 for n in server.attempts.values())  # not retried
    assert not (tmp_path / "c").exists()  # nothing cached


def test_api_key_from_the_named_variable_and_never_shown(server, tiny, tmp_path, monkeypatch, caplog):
    spec, model = tiny
    caplog.set_level(logging.DEBUG)
    server.api_key = SECRET
    monkeypatch.setenv("VERIFIER_TEST_KEY", SECRET)
    prompts, responses, stopped = columns(TINY_ROWS[:3])
    cfg = served_config(spec, server, tmp_path, key_env="VERIFIER_TEST_KEY", cache=None)
    v = load_served(cfg)
    assert SECRET not in repr(v) and SECRET not in repr(v.remote) and SECRET not in repr(v.remote.endpoint)
    assert_same_scores(
        score_texts(v, prompts, responses, stopped), score_texts(local_twin(cfg, model), *columns(TINY_ROWS[:3]))
    )
    assert server.auth and all(a == f"Bearer {SECRET}" for a in server.auth)
    monkeypatch.setenv("VERIFIER_TEST_KEY", "sk-wrong-key-123")
    with pytest.raises(CmeError, match=r"HTTP 401.*check the API key") as e:
        score_texts(load_served(cfg), prompts, responses, stopped)
    assert "sk-wrong-key-123" not in str(e.value) and SECRET not in caplog.text
    monkeypatch.delenv("VERIFIER_TEST_KEY")
    with pytest.raises(CmeError, match=r"environment variable VERIFIER_TEST_KEY is not set.*key_env"):
        load_verifier(cfg)


def test_cache_skips_rows_already_scored_after_an_interruption(server, tiny, tmp_path):
    spec, model = tiny
    prompts, responses, stopped = columns(TINY_ROWS)
    cfg = served_config(spec, server, tmp_path, request_rows=2, concurrency=1, retries=0)
    want = score_texts(local_twin(cfg, model), prompts, responses, stopped)
    server.faults = Faults(down_after=2)  # two requests answered, then the server fails
    with pytest.raises(CmeError, match="failed 1 times; last error: HTTP 503"):
        score_texts(load_served(cfg), prompts, responses, stopped)
    first = [tuple(r) for r in server.scored_rows]
    assert len(first) == 4
    lines = cache_path(tmp_path / "cache", "tiny").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["judge"] == "tiny" for line in lines)

    server.reset()
    got = score_texts(load_served(cfg), prompts, responses, stopped)  # a new client reads the cache file
    assert_same_scores(got, want)
    second = [tuple(r) for r in server.scored_rows]
    assert len(second) == 2 and not set(first) & set(second)  # 6 distinct non-empty rows in all
    server.reset()
    assert_same_scores(score_texts(load_served(cfg), prompts, responses, stopped), want)
    assert server.bodies == []  # everything cached: no request at all
    # another served model never reads these scores
    other = dataclasses.replace(cfg, server_model="tiny-2", name="other")
    server.models["tiny-2"] = model
    score_texts(load_served(other), prompts, responses, stopped)
    assert len(server.scored_rows) == 6


def test_all_rows_in_flight_at_once(server, tiny, tmp_path):
    spec, _ = tiny
    server.faults = Faults(hold=0.5)
    prompts, responses, stopped = columns(TINY_ROWS)
    cfg = served_config(spec, server, tmp_path, concurrency=3, cache=None, contrastive=True)
    got = score_texts(load_served(cfg), prompts, responses, stopped)
    # 6 distinct rows and their 6 empty-prompt twins: 3 requests of 4 rows, all in flight together
    assert sorted(len(b["prompt"]) for b in server.bodies) == [4, 4, 4]
    assert server.max_inflight == 3
    assert got.served_seconds >= 0.5


# ----------------------------------------------------------------------------------------------------------
# Every consumer: rewards (mixed with a local verifier), the trainer's device path, score, audit forms


def test_compute_rewards_with_served_and_local_verifiers(server, tiny, tmp_path):
    spec, model = tiny
    served = served_config(spec, server, tmp_path, name="served", cache=None)
    local = VerifierConfig(model=spec, name="local", context="chat")
    rcfg = RewardConfig(verifiers=(local, served), zscore=True)
    prompts, responses, stopped = columns(TINY_ROWS)
    batch = RewardBatch(prompts[::2], responses, stopped)
    out = compute_rewards(rcfg, batch, verifiers=[Verifier.from_model(local, model), load_served(served)])
    np.testing.assert_allclose(out.components["cme/served"], out.components["cme/local"], atol=1e-5, rtol=0)
    assert out.timings["time/score_remote"] > 0


def test_device_reward_refuses_served_verifiers(server, tiny_models, tmp_path):
    policy = load_model(tiny_models["policy"])
    cfg = served_config(tiny_models["same_vocab"], server, tmp_path, name="v")
    local = Verifier.from_model(VerifierConfig(model=tiny_models["same_vocab"], name="v"), load_model(cfg.model))
    assert local.shares_vocabulary(policy.tokenizer)
    assert device_reward_fn(RewardConfig(verifiers=(local.config,)), [local], policy.cfg, policy.tokenizer, 2)
    v = load_served(cfg)
    assert v.model.weights is None and not v.shares_vocabulary(policy.tokenizer)
    assert device_reward_fn(RewardConfig(verifiers=(cfg,)), [v], policy.cfg, policy.tokenizer, 2) is None


def test_score_command_and_audit_forms_take_a_served_verifier(server, tiny, tmp_path):
    spec, model = tiny
    prompts, responses, stopped = columns(TINY_ROWS)
    rows = [{"prompt": p, "response": r, "stopped": bool(s)} for p, r, s in zip(prompts, responses, stopped)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry = {"name": "big", "model": spec, "url": server.url, "server_model": "tiny", "context": "chat", "cache": None}
    (tmp_path / "v.yaml").write_text(json.dumps({"verifiers": [entry]}))
    score_main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--config",
            str(tmp_path / "v.yaml"),
            "--no-progress",
        ]
    )
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    cfg = VerifierConfig(**entry)
    want = score_texts(local_twin(cfg, model), prompts, responses, stopped)
    for g, m, e in zip(got, want.mean, want.empty):
        assert g["cme_big"] == (-10.0 if e else pytest.approx(float(m), abs=1e-5))

    (audited,) = read_reward_file(tmp_path / "v.yaml").verifiers  # audit --config reads the same list
    assert audited == cfg and audited.served
    nonempty = [i for i, r in enumerate(responses) if r]
    texts, ps = [responses[i] for i in nonempty], [prompts[i] for i in nonempty]
    remote = score_forms(load_served(cfg), ps, texts, batch_size=4)
    local = score_forms(local_twin(cfg, model), ps, texts, batch_size=4)
    for form in ("plain", "contrastive"):
        np.testing.assert_allclose(form_scores(remote, form), form_scores(local, form), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"url": "node7:8000/v1"}, "verifier.url='node7:8000/v1' must be the http"),
        ({"server_model": "big"}, "verifier.server_model applies to served verifiers only"),
        ({"concurrency": 4}, "verifier.concurrency applies to served verifiers only"),
        ({"url": "http://h:8000/v1", "dtype": "bfloat16"}, "verifier.dtype='bfloat16': a served verifier"),
        ({"url": "http://h:8000/v1", "key_env": "MY-KEY"}, "verifier.key_env='MY-KEY' must be the name"),
        ({"url": "http://h:8000/v1", "concurrency": 0}, "verifier.concurrency=0 must be an integer >= 1"),
        ({"url": "http://h:8000/v1", "retries": -1}, "verifier.retries=-1 must be an integer >= 0"),
        ({"url": "http://h:8000/v1", "timeout": 0}, "verifier.timeout=0.0 must be a number of seconds > 0"),
        (
            {"url": "http://h:8000/v1", "request_rows": 1.5},
            r"reward.verifiers\[0\].request_rows should be an integer, got 1.5",
        ),
        ({"url": "http://h:8000/v1", "cache": ""}, "verifier.cache='' must be a directory"),
        ({"url": "http://h:8000/v1", "urls": "x"}, "unknown config key 'reward.verifiers\\[0\\].urls'"),
    ],
)
def test_bad_served_settings_are_one_line(entry, message, tiny_models, prompts_file, tmp_path):
    cfg = tiny_config(tiny_models, prompts_file, tmp_path / "run")
    cfg["reward"]["verifiers"] = [{"name": "v", "model": "org/big", **entry}]
    with pytest.raises(CmeError, match=message) as e:
        load_config(write_config(tmp_path / "c.yaml", cfg))
    assert "\n" not in str(e.value)


def test_served_verifier_config_round_trips(tiny_models, prompts_file, tmp_path):
    cfg = tiny_config(tiny_models, prompts_file, tmp_path / "run")
    cfg["reward"]["verifiers"] = [{"model": "Qwen/Qwen2.5-72B-Instruct", "url": "http://node7:8000/v1"}]
    loaded = load_config(write_config(tmp_path / "c.yaml", cfg))
    (v,) = loaded.reward.verifiers
    assert v.served and v.server_model == "Qwen/Qwen2.5-72B-Instruct" and v.name == "Qwen2.5-72B-Instruct"
    again = tmp_path / "again.yaml"
    again.write_text(config_yaml(loaded))
    assert load_config(again) == loaded


def test_shipped_served_verifier_config_loads():
    cfg = load_config(ROOT / "configs" / "llama3.1-8b-instruct_served-qwen2.5-72b.yaml")
    (v,) = cfg.reward.verifiers
    assert v.served and v.url.startswith("http://") and v.key_env == "VERIFIER_API_KEY"
    assert (cfg.model.policy, v.model, v.server_model) == (
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen2.5-72B-Instruct",
        "Qwen/Qwen2.5-72B-Instruct",
    )


# ----------------------------------------------------------------------------------------------------------
# Training


def test_training_with_a_served_verifier_equals_training_with_the_local_one(
    server, tiny, tiny_models, prompts_file, tmp_path
):
    runs = {}  # `tiny` registers the verifier the server serves
    for kind in ("local", "served"):
        cfg = tiny_config(tiny_models, prompts_file, tmp_path / kind, train={"steps": 3, "fused": True})
        cfg["checkpoint"] = {"every": 3, "keep": 1, "async_save": False}
        cfg["logging"] = {"samples_every": 0, "preview_tokens": 0, "tensorboard": False}
        if kind == "served":
            cfg["reward"]["verifiers"][0].update(url=server.url, server_model="tiny", cache=None, concurrency=8)
        runs[kind] = train_mod.train(load_config(write_config(tmp_path / f"{kind}.yaml", cfg)))
    pairs = zip(jax.tree.leaves(runs["served"].state.params), jax.tree.leaves(runs["local"].state.params))
    diff = np.concatenate([np.abs(np.asarray(x) - np.asarray(y)).ravel() for x, y in pairs])
    # Rewards agree to ~1e-7. AdamW divides each gradient element by its own magnitude, which turns that into
    # up to a few 1e-5 (lr = 1e-3) on the rare elements whose gradient is nearly zero; all others agree to 1e-6.
    assert diff.max() < 1e-4 and (diff > 1e-6).mean() < 1e-3, (diff.max(), (diff > 1e-6).sum())
    served, local = metric_rows(tmp_path / "served"), metric_rows(tmp_path / "local")
    assert len(served) == len(local) == 3
    for a, b in zip(served, local):
        rewards = [k for k in a if k.startswith(("reward/", "cme/"))]
        assert rewards and {k: a[k] for k in rewards} == pytest.approx({k: b[k] for k in rewards}, rel=0, abs=1e-5)
        # the loss and the advantages' mean are sums of nearly cancelling terms: compared relative to their terms
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    timed = [json.loads(line) for line in (tmp_path / "served" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["time/score_remote"] <= r["time/score"] for r in timed)
    # 2 prompts x 2 samples a step, all sent at once: one request per row, each step's in flight together
    assert len(server.bodies) >= 3 and all(len(b["prompt"]) == 1 for b in server.bodies)
