"""Verifier scoring (CME) against transformers on the same token sequences; fast path; sharding; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from tiny_hf import tiny_model, tiny_tokenizer

from cme_jax.models.sharding import make_mesh
from cme_jax.score import main as score_main
from cme_jax.scoring import (
    Verifier,
    VerifierConfig,
    check_finite,
    default_verifier_name,
    encode_response,
    end_of_turn_id,
    hidden_token_ids,
    load_verifier,
    pack_rows,
    same_tokenizer,
    score_rows_jit,
    score_same_vocab_jit,
    score_texts,
    visible_response,
)
from cme_jax.sources import load_model
from tests.helpers import cli_error, run_module

TINY_PROMPTS = ["hello world", "the quick brown fox", "answer the question"]
TINY_RESPONSES = [
    "one two three four",
    " the lazy dog jumps over <|im_end|> and more",  # special-token text inside: must stay text
    "\n\nnine ten\n",
]


# ----------------------------------------------------------------------------------------------------------
# References written here: transformers on the ids the test builds itself


def ref_context(tok, prompt: str, chat: bool, template: str = "{prompt}\n") -> list[int]:
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(template.replace("{prompt}", prompt))["input_ids"]


def ref_response(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def hf_mean_logprob(hf, context: list[int], response: list[int]) -> float:
    """Mean log p(response tokens | context) from one unpadded PyTorch forward."""
    ids = torch.tensor([context + response]).long()
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(context) - 1 : -1]
    return float(lp.gather(-1, torch.tensor(response)[:, None])[:, 0].mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, transformers model, cme_jax LoadedModel) of a tiny Llama with a chat-template tokenizer."""
    path = tmp_path_factory.mktemp("tiny_verifier")
    hf = tiny_model("llama", vocab_size=320)
    hf.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path, hf, load_model(str(path))


def verifier(tiny, **kw) -> Verifier:
    path, _, model = tiny
    return Verifier.from_model(VerifierConfig(model=str(path), **kw), model)


# ----------------------------------------------------------------------------------------------------------
# Config and tokenization


def test_verifier_config_defaults_and_name():
    vc = VerifierConfig(model="google/gemma-3-270m")
    assert (vc.name, vc.weight, vc.context, vc.score_eos, vc.dtype, vc.contrastive) == (
        "gemma-3-270m",
        1.0,
        "auto",
        False,
        "auto",
        False,
    )
    assert default_verifier_name("/models/My Model.gguf") == "My-Model"
    assert default_verifier_name("org/name@rev") == "name"
    assert hash(vc) == hash(VerifierConfig(model="google/gemma-3-270m"))  # usable as a static jit argument


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(model=""), "verifier.model"),
        (dict(model="m", name="bad name"), "verifier.name"),
        (dict(model="m", weight="1"), "verifier.weight"),
        (dict(model="m", weight=float("nan")), "verifier.weight"),
        (dict(model="m", context="html"), "verifier.context"),
        (dict(model="m", template="no placeholder"), "verifier.template"),
        (dict(model="m", dtype="float16"), "verifier.dtype"),
        (dict(model="m", score_eos="yes"), "verifier.score_eos"),
        (dict(model="m", max_length=0), "verifier.max_length"),
        (dict(model="m", contrastive=1), "verifier.contrastive"),
    ],
)
def test_verifier_config_rejects_bad_values_in_one_line(kw, field):
    with pytest.raises(ValueError, match=field) as e:
        VerifierConfig(**kw)
    assert "\n" not in str(e.value)


def test_same_tokenizer_identity_test(tiny):
    path, _, model = tiny
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(path)
    assert same_tokenizer(model.tokenizer, again)
    extra = AutoTokenizer.from_pretrained(path)
    extra.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert not same_tokenizer(model.tokenizer, extra)
    other_eos = AutoTokenizer.from_pretrained(path)
    other_eos.eos_token = "<|endoftext|>"
    assert not same_tokenizer(model.tokenizer, other_eos)
    assert not same_tokenizer(model.tokenizer, tiny_tokenizer(vocab=300))


def test_special_token_text_in_a_response_stays_text(tiny):
    tok = tiny[2].tokenizer
    ids = encode_response(tok, "a <|im_end|> b <|im_start|>")
    assert 1 not in ids and 2 not in ids
    assert tok.decode(ids) == "a <|im_end|> b <|im_start|>"
    assert encode_response(tok, "") == []


def test_end_of_turn_token_from_the_chat_template(tiny):
    tok = tiny[2].tokenizer
    assert end_of_turn_id(tok, chat=True) == tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok, chat=False) == tok.eos_token_id


def test_hidden_ids_are_what_decoding_drops(tiny):
    tok = tiny[2].tokenizer
    assert hidden_token_ids(tok).tolist() == [0, 1, 2]
    assert tok.decode([5, 1, 6, 0, 2], skip_special_tokens=True) == tok.decode([5, 6])


def test_visible_response_drops_the_stop_token_and_hidden_ids():
    tokens = np.array([[5, 1, 6, 2, 0], [7, 8, 9, 1, 4], [1, 0, 2, 0, 0], [3, 3, 3, 3, 3]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
    stopped = np.array([True, False, True, False])
    toks, n = visible_response(tokens, mask, stopped, np.array([0, 1, 2], np.int32), pad_id=-1)
    assert np.asarray(n).tolist() == [2, 4, 0, 0]
    assert np.asarray(toks).tolist() == [[5, 6, -1, -1, -1], [7, 8, 9, 4, -1], [-1] * 5, [-1] * 5]
    toks, n = visible_response(tokens, mask, stopped, None, pad_id=-1)  # no hidden ids: only the stop token goes
    assert np.asarray(n).tolist() == [3, 5, 2, 0] and np.asarray(toks)[0].tolist() == [5, 1, 6, -1, -1]


def test_pack_rows_left_pads_context_and_right_pads_response():
    tokens, mask, start = pack_rows([[5, 6], [7]], [[8], [9, 10, 11]], pad=0, rows=3)
    assert start == 16 and tokens.shape == (3, 32)
    assert tokens[0, 14:17].tolist() == [5, 6, 8] and mask[0].sum() == 3
    assert tokens[1, 15:19].tolist() == [7, 9, 10, 11] and mask[1, 15:19].all() and mask[1].sum() == 4
    assert not mask[2].any()


# ----------------------------------------------------------------------------------------------------------
# Numbers against transformers (tiny model)


@pytest.mark.parametrize("chat", [True, False])
def test_cme_equals_transformers_on_tiny_model(tiny, chat):
    _, hf, model = tiny
    tok = model.tokenizer
    template = "Q: {prompt}\nA:"
    v = verifier(tiny, context="chat" if chat else "plain", template=template)
    got = score_texts(v, TINY_PROMPTS, TINY_RESPONSES, batch_size=2)  # two batches, padded rows
    for i, (p, r) in enumerate(zip(TINY_PROMPTS, TINY_RESPONSES)):
        ctx, resp = ref_context(tok, p, chat, template), ref_response(tok, r)
        assert 2 not in resp
        assert got.count[i] == len(resp)
        assert got.mean[i] == pytest.approx(hf_mean_logprob(hf, ctx, resp), abs=1e-5)
    assert not got.empty.any() and not got.truncated.any()


def test_score_eos_after_stopped_responses_only(tiny):
    _, hf, model = tiny
    tok = model.tokenizer
    v = verifier(tiny, score_eos=True)
    stopped = [True, False, True]
    got = score_texts(v, TINY_PROMPTS, TINY_RESPONSES, stopped)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for i, (p, r) in enumerate(zip(TINY_PROMPTS, TINY_RESPONSES)):
        resp = ref_response(tok, r) + ([eot] if stopped[i] else [])
        assert got.count[i] == len(resp)
        assert got.mean[i] == pytest.approx(hf_mean_logprob(hf, ref_context(tok, p, True), resp), abs=1e-5)


def test_long_responses_are_scored_on_their_first_tokens_and_counted(tiny):
    _, hf, model = tiny
    tok = model.tokenizer
    v = verifier(tiny, max_length=5, score_eos=True)
    got = score_texts(v, TINY_PROMPTS, TINY_RESPONSES)
    for i, (p, r) in enumerate(zip(TINY_PROMPTS, TINY_RESPONSES)):
        full = ref_response(tok, r)
        assert got.truncated[i] == (len(full) > 5)
        resp = full[:5] if len(full) > 5 else [*full, tok.convert_tokens_to_ids("<|im_end|>")]
        assert got.mean[i] == pytest.approx(hf_mean_logprob(hf, ref_context(tok, p, True), resp), abs=1e-5)
    assert got.truncated.sum() >= 2


def test_empty_responses_are_flagged(tiny):
    tok = tiny[2].tokenizer
    decoded = tok.decode([tok.convert_tokens_to_ids("<|im_start|>")], skip_special_tokens=True)
    assert decoded == ""  # special ids only: decodes to the empty string
    got = score_texts(verifier(tiny), ["a", "b", "c"], ["", decoded, "x"])
    assert got.empty.tolist() == [True, True, False]
    assert got.count.tolist()[:2] == [0, 0] and np.isfinite(got.mean).all()


def test_contrastive_subtracts_the_empty_prompt_score(tiny):
    _, hf, model = tiny
    tok = model.tokenizer
    got = score_texts(verifier(tiny, contrastive=True), TINY_PROMPTS, TINY_RESPONSES)
    for i, (p, r) in enumerate(zip(TINY_PROMPTS, TINY_RESPONSES)):
        resp = ref_response(tok, r)
        want = hf_mean_logprob(hf, ref_context(tok, p, True), resp) - hf_mean_logprob(
            hf, ref_context(tok, "", True), resp
        )
        assert got.mean[i] == pytest.approx(want, abs=1e-5)


def test_row_blocks_give_the_same_scores(tiny):
    model = tiny[2]
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 320, (5, 40)).astype(np.int32)
    mask = np.ones((5, 40), bool)
    mask[1, :10] = mask[3, 30:] = False  # some left padding and some right padding
    whole = score_rows_jit(model.weights, model.cfg, tokens, mask, start=16, block_tokens=10**6)
    blocks = score_rows_jit(model.weights, model.cfg, tokens, mask, start=16, block_tokens=64)  # 4 blocks, padded
    np.testing.assert_allclose(np.asarray(blocks[0]), np.asarray(whole[0]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(blocks[1]), np.asarray(whole[1]))
    assert np.asarray(whole[1]).tolist() == [24, 24, 24, 14, 24]


def test_sharded_scoring_equals_single_device(tiny):
    path = tiny[0]
    mesh = make_mesh(data=2, fsdp=1, tensor=2)
    sharded = load_model(str(path), mesh=mesh)
    v = Verifier.from_model(VerifierConfig(model=str(path)), sharded)
    # 5 rows: padded to 6 for the data axis
    prompts, responses = (TINY_PROMPTS * 2)[:5], (TINY_RESPONSES[::-1] * 2)[:5]
    want = score_texts(verifier(tiny), prompts, responses)
    for block_tokens in (4096, 48):  # one block; then blocks of rows that span the data axis
        got = score_texts(v, prompts, responses, mesh=mesh, block_tokens=block_tokens)
        np.testing.assert_allclose(got.mean, want.mean, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.count, want.count)


def test_bfloat16_verifier_scores_close_to_float32(tiny):
    path = str(tiny[0])
    v = load_verifier(VerifierConfig(model=path, dtype="bfloat16"))
    assert v.model.weights.embed.dtype == jnp.bfloat16
    got = score_texts(v, TINY_PROMPTS, TINY_RESPONSES)
    want = score_texts(verifier(tiny), TINY_PROMPTS, TINY_RESPONSES)
    assert got.mean.dtype == np.float32
    np.testing.assert_allclose(got.mean, want.mean, atol=0.05, rtol=0)


def test_non_finite_scores_fail_naming_the_verifier(tiny):
    _, _, model = tiny
    import dataclasses

    from cme_jax.errors import CmeError

    broken = dataclasses.replace(model, weights=model.weights.replace(final_norm=model.weights.final_norm * jnp.nan))
    v = Verifier.from_model(VerifierConfig(model="x", name="judge"), broken)
    s = score_texts(v, TINY_PROMPTS, TINY_RESPONSES)
    with pytest.raises(CmeError, match="verifier 'judge' gave 3 non-finite"):
        check_finite(s.mean, ~s.empty, "verifier 'judge'")


# ----------------------------------------------------------------------------------------------------------
# Same-vocabulary fast path


def rollout_like(tok, texts: list[str], stopped: list[bool], stop_id: int, width: int, insert: int | None = None):
    """Policy-style rows: response ids right-padded to `width`, the stop token last when stopped.

    With `insert`, that (special) id is put after the first token of every row, as a policy may sample it.
    """
    rows = []
    for t, s in zip(texts, stopped):
        ids = ref_response(tok, t)
        if insert is not None:
            ids = [*ids[:1], insert, *ids[1:]]
        rows.append(ids + ([stop_id] if s else []))
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return tokens, mask, np.asarray(stopped)


@pytest.mark.parametrize(
    ("score_eos", "max_length", "insert", "contrastive"),
    [(False, 1024, None, False), (True, 1024, 1, False), (True, 6, 0, True)],
)
def test_fast_path_equals_text_path(tiny, score_eos, max_length, insert, contrastive):
    tok = tiny[2].tokenizer
    v = verifier(tiny, score_eos=score_eos, max_length=max_length, contrastive=contrastive)
    prompts = TINY_PROMPTS[:3]
    texts = [*TINY_RESPONSES[:2], "", "five six seven", TINY_RESPONSES[2], ""]  # G = 2, empty responses
    stopped = [True, False, True, True, False, False]
    tokens, mask, stopped_R = rollout_like(tok, texts, stopped, 2, 40, insert)
    assert [tok.decode(t[m], skip_special_tokens=True) for t, m in zip(tokens, mask)] == texts
    if insert is not None:
        assert (tokens == insert).sum(axis=1).min() >= 1  # even the empty responses hold the special id

    def fast(ps):
        ctx = [v.context_ids(p) for p in ps]
        C = max(map(len, ctx))
        ctx_tokens = np.array([[0] * (C - len(c)) + c for c in ctx], np.int32)
        ctx_mask = np.array([[False] * (C - len(c)) + [True] * len(c) for c in ctx])
        kw = dict(end_id=v.end_id, score_eos=score_eos, max_length=max_length, pad_id=v.pad)
        out = score_same_vocab_jit(
            v.model.weights, v.model.cfg, ctx_tokens, ctx_mask, tokens, mask, stopped_R, hidden_ids_K=v.hidden_ids, **kw
        )
        return {k: np.asarray(x) for k, x in out.items()}

    got = fast(prompts)
    mean = got["mean"] - fast([""])["mean"] if contrastive else got["mean"]
    text = score_texts(v, [p for p in prompts for _ in range(2)], texts, stopped)
    np.testing.assert_allclose(mean, text.mean, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["count"], text.count)
    np.testing.assert_array_equal(got["empty"], text.empty)
    np.testing.assert_array_equal(got["truncated"], text.truncated)
    assert text.empty.tolist() == [False, False, True, False, False, True]


# ----------------------------------------------------------------------------------------------------------
# Command line


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_scores_rows_with_two_weighted_verifiers(tiny, tmp_path):
    path = tiny[0]
    rows = [{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(zip(TINY_PROMPTS, TINY_RESPONSES))]
    rows.append({"prompt": "empty", "response": ""})
    config = tmp_path / "score.yaml"
    a_cfg = dict(model=str(path), name="a", weight=0.25, context="plain", template="Q: {prompt}\nA:", contrastive=True)
    b_cfg = dict(model=str(path), name="b", weight=2.0, context="chat", score_eos=True)
    reward = dict(terms=["cme"], verifiers=[a_cfg, b_cfg], empty_reward=-7.5)
    config.write_text(yaml.safe_dump({"reward": reward, "grpo": {"beta": 0.0}}))
    out = tmp_path / "out.jsonl"
    src = write_rows(tmp_path / "in.jsonl", rows)
    proc = run_module("cme_jax.score", "--input", str(src), "--output", str(out), "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "cme a" in proc.stderr and "scored 4 rows (1 empty)" in proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got[:3]] == [0, 1, 2] and got[3]["response"] == ""
    a_v = verifier(tiny, context="plain", template="Q: {prompt}\nA:", contrastive=True)
    a = score_texts(a_v, TINY_PROMPTS, TINY_RESPONSES)
    b = score_texts(verifier(tiny, score_eos=True), TINY_PROMPTS, TINY_RESPONSES)
    for i in range(3):
        assert got[i]["cme_a"] == pytest.approx(a.mean[i], abs=1e-5)
        assert got[i]["cme_b"] == pytest.approx(b.mean[i], abs=1e-5)
        assert got[i]["cme"] == pytest.approx(0.25 * a.mean[i] + 2.0 * b.mean[i], abs=1e-5)
    assert got[3]["cme"] == got[3]["cme_a"] == got[3]["cme_b"] == -7.5


def test_cli_bad_input_gives_one_line(tiny, tmp_path, capsys):
    path = str(tiny[0])
    good = write_rows(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}])
    out = str(tmp_path / "out.jsonl")

    def fails(*argv: str) -> str:
        return cli_error(capsys, score_main, argv)

    assert "does not exist" in fails("--input", str(tmp_path / "no.jsonl"), "--output", out, "--verifier", path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{oops\n')
    assert "bad.jsonl:2 is not valid JSON" in fails("--input", str(bad), "--output", out, "--verifier", path)
    missing = write_rows(tmp_path / "missing.jsonl", [{"prompt": "p"}])
    assert "needs a string 'response'" in fails("--input", str(missing), "--output", out, "--verifier", path)
    assert "no verifier given" in fails("--input", str(good), "--output", out)
    err = fails("--input", str(good), "--output", out, "--verifier", path, "--template", "plain")
    assert "verifier.template" in err
    assert "does not exist" in fails("--input", str(good), "--output", out, "--verifier", "./nowhere")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("verifiers: [{model: x, wieght: 2}]\n")
    assert "unknown key 'wieght'" in fails("--input", str(good), "--output", out, "--config", str(cfg))
    cfg.write_text("verifiers: [m1]\nbatch: 3\n")
    assert "unknown key 'batch'" in fails("--input", str(good), "--output", out, "--config", str(cfg))


# ----------------------------------------------------------------------------------------------------------
# The two real embedded models against transformers


REAL_PROMPTS = [
    "What is the capital of France?",
    "Write one line about the sea.",
    "Say something odd.",
    "Repeat the markers.",
    "Anything?",
]
REAL_RESPONSES = [
    " Paris is the capital of France.",  # leading space
    "\n\nWaves fold\nover the grey sand.\n",  # newlines
    "Ünïcödé — 日本語 and emoji 😀🎉!",
    "Markers: <|im_end|> <eos> <start_of_turn> <|im_start|>",  # special-token text stays text
    "",  # empty
]


def _real_case(model, hf, chat: bool, template: str):
    tok = model.tokenizer
    v = Verifier.from_model(
        VerifierConfig(model=model.spec, context="chat" if chat else "plain", template=template), model
    )
    got = score_texts(v, REAL_PROMPTS, REAL_RESPONSES, batch_size=4)
    specials = set(tok.all_special_ids)
    for i, (p, r) in enumerate(zip(REAL_PROMPTS, REAL_RESPONSES)):
        resp = ref_response(tok, r)
        assert not specials & set(resp)
        assert tok.decode(resp) == r
        if not r:
            assert got.empty[i] and got.count[i] == 0
            continue
        want = hf_mean_logprob(hf, ref_context(tok, p, chat, template), resp)
        assert got.mean[i] == pytest.approx(want, abs=1e-4), (i, r)


@pytest.mark.slow
def test_cme_under_gemma_with_plain_template_equals_transformers(gemma, hf_gemma):
    assert gemma.tokenizer.bos_token_id is not None
    _real_case(gemma, hf_gemma, chat=False, template="Question: {prompt}\nAnswer:")


@pytest.mark.slow
def test_cme_under_smollm_with_chat_template_equals_transformers(smollm, hf_smollm):
    _real_case(smollm, hf_smollm, chat=True, template="{prompt}\n")


@pytest.mark.slow
def test_fast_path_equals_text_path_on_smollm(smollm):
    """SmolLM2 as its own verifier: ids through the fast path, decoded text through re-tokenization."""
    tok = smollm.tokenizer
    from cme_jax.rewards import RewardBatch, RewardConfig, compute_rewards

    prompts = REAL_PROMPTS[:2]
    texts = [REAL_RESPONSES[0], REAL_RESPONSES[2], REAL_RESPONSES[1], REAL_RESPONSES[3]]
    tokens, mask, stopped = rollout_like(tok, texts, [True, False, True, True], 2, 40)
    prompt_ids = [ref_context(tok, p, True) for p in prompts]
    C = max(map(len, prompt_ids))
    ptoks = np.array([[2] * (C - len(c)) + c for c in prompt_ids], np.int32)
    pmask = np.array([[False] * (C - len(c)) + [True] * len(c) for c in prompt_ids])
    batch = RewardBatch(prompts, texts, stopped, None, tokens, mask, ptoks, pmask)
    rcfg = RewardConfig(verifiers=(VerifierConfig(model="smollm2-135m-instruct", name="s", score_eos=True),))
    v = Verifier.from_model(rcfg.verifiers[0], smollm)
    assert v.shares_vocabulary(tok)
    fast = compute_rewards(rcfg, batch, verifiers=[v], policy=smollm)
    text = compute_rewards(rcfg, batch, verifiers=[v], policy=None)  # no policy: the text path
    np.testing.assert_allclose(fast.rewards, text.rewards, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cli_with_embedded_gemma(gemma, hf_gemma, tmp_path):
    rows = [{"prompt": p, "response": r} for p, r in zip(REAL_PROMPTS[:3], REAL_RESPONSES[:3])]
    out = tmp_path / "out.jsonl"
    args = ["--input", str(write_rows(tmp_path / "in.jsonl", rows)), "--output", str(out), "--verifier", "gemma3-270m"]
    proc = run_module("cme_jax.score", *args, "--context", "plain", "--template", "Q: {prompt}\nA:")
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    tok = gemma.tokenizer
    for g, r in zip(got, rows):
        want = hf_mean_logprob(
            hf_gemma, ref_context(tok, r["prompt"], False, "Q: {prompt}\nA:"), ref_response(tok, r["response"])
        )
        assert g["cme_gemma3-270m"] == pytest.approx(want, abs=1e-4) and g["cme"] == g["cme_gemma3-270m"]
