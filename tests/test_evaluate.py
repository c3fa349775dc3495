"""Head-to-head evaluation: real policies (a run directory, both embedded models), a local JAX judge, an HTTP judge
served by a real model, CME metrics checked against direct scoring, output caching and one-line input errors."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cme_jax import checkpoint, tokens
from cme_jax import evaluate as evaluate_cmd
from cme_jax.checkpoint import CheckpointManager
from cme_jax.errors import CmeError
from cme_jax.eval import evaluation as ev
from cme_jax.eval import judging
from cme_jax.eval.audit import shipped_pairs
from cme_jax.eval.judging import IDENTICAL_NOTE, FunctionJudge, OpenAIJudge, parse_verdict, render_pairwise
from cme_jax.prompts import DataConfig, load_prompts
from cme_jax.sampling import SamplingConfig, generate_responses
from cme_jax.scoring import Verifier, VerifierConfig, score_texts
from cme_jax.tokens import format_prompt
from tests.helpers import EVAL_RESULT_KEYS, assert_one_line_error, cli_error, no_proxy, run_module
from tests.json_server import ChatServer

SECRET = "sk-eval-SECRET-4d9b2e71c0"
KEY_ENV = "CME_EVAL_TEST_KEY"
# Short outputs on the shortest held-out prompts keep every judge conversation in one length bucket
# (256 tokens), so the judge compiles once in the whole file. Unparsed-verdict retries, which would need
# another bucket, are covered by tests/test_judging.py.
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=0.0)
JUDGE_TOKENS = 8
JUDGE_BATCH = 2
GEMMA_TEMPLATE = "Question: {prompt}\nAnswer:"
HELDOUT = 0.05
SYSTEM = "You are a concise assistant, trained with cme_jax."
N_PROMPTS = 3


@pytest.fixture(scope="module")
def prompts():
    heldout = ev.load_eval_prompts("builtin:prompts", heldout_fraction=HELDOUT)
    return sorted(heldout, key=lambda p: len(p.instruction))[:N_PROMPTS]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, smollm):
    """A real run directory: SmolLM2 weights, perturbed as if trained, saved at step 7 with the trainer's metadata
    (its config asks for a system prompt, which the evaluation must apply as training did)."""
    leaves, treedef = jax.tree.flatten(smollm.weights)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x * (1 + 0.05 * jax.random.normal(k, x.shape, x.dtype)) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, noisy)
    run = tmp_path_factory.mktemp("evaluate") / "run"
    meta = {
        "model_spec": "smollm2-135m-instruct",
        "config": {
            "model": {"prompt_format": "auto", "system_prompt": SYSTEM},
            "data": {"source": "builtin:prompts", "heldout_fraction": HELDOUT},
        },
    }
    with CheckpointManager(run) as mngr:
        mngr.save(7, {"params": params, "step": jnp.int32(7)}, meta)
    return run, params


class CountingJudge:
    """Wraps a judge and counts the conversations it is asked."""

    def __init__(self, inner):
        self.inner, self.asked = inner, 0

    @property
    def judge_id(self):
        return self.inner.judge_id

    def judge(self, conversations, on_result=None):
        self.asked += len(conversations)
        return self.inner.judge(conversations, on_result=on_result)


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def check_results(out: Path, returned: dict, n_prompts: int) -> dict:
    """Every file is written and results.json is self-consistent; returns it."""
    for name in ("results.json", "judgments.jsonl", "report.md", "report.png", "judge_cache.jsonl"):
        assert (out / name).is_file(), name
    for side in ("model", "baseline"):
        assert (out / side / "model_outputs.json").is_file()
    results = read_json(out / "results.json")
    assert results == returned
    for key in EVAL_RESULT_KEYS:
        assert key in results
    assert results["wins"] + results["ties"] + results["losses"] == results["n"]
    assert results["n"] + results["unparsed"] == n_prompts == results["n_total"]
    if results["n"]:
        assert results["win_rate_tie_adjusted"] == pytest.approx(
            (results["wins"] + 0.5 * results["ties"]) / results["n"]
        )
        assert 0 <= results["ci95_low"] <= results["win_rate_tie_adjusted"] <= results["ci95_high"] <= 1
    else:
        assert results["win_rate_tie_adjusted"] is None
    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(records) == n_prompts
    assert sum(r["outcome"] == "unparsed" for r in records) == results["unparsed"]
    for r in records:
        if r["model_output"].strip() == r["base_output"].strip():
            assert r["outcome"] == "tie" and r["judge_output_model_as_a"] == [IDENTICAL_NOTE]
        else:
            assert r["judge_output_model_as_a"] and r["judge_output_model_as_b"]
            assert r["verdict_model_as_a"] == parse_verdict(r["judge_output_model_as_a"][-1])
            assert r["verdict_model_as_b"] == parse_verdict(r["judge_output_model_as_b"][-1])
    report = (out / "report.md").read_text()
    assert "## Automatic metrics" in report and "distinct-2" in report
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    return results


def check_outputs(out: Path, prompts, side: str, generator: str) -> list[str]:
    """model_outputs.json has AlpacaEval's fields, in prompt order; returns the outputs."""
    rows = read_json(out / side / "model_outputs.json")
    assert [r["instruction"] for r in rows] == [p.instruction for p in prompts]
    for r in rows:
        assert set(r) <= {"instruction", "output", "generator", "dataset"}
        assert isinstance(r["output"], str) and r["generator"] == generator
    return [r["output"] for r in rows]


def distinct_2(texts):
    """Word bigrams, distinct over total, written out independently of cme_jax.metrics."""
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------------------------------------
# Cheap pieces


def test_heldout_prompts_are_the_training_split(prompts):
    every = ev.load_eval_prompts("builtin:prompts", heldout_fraction=HELDOUT)
    split = load_prompts(DataConfig(source="builtin:prompts", heldout_fraction=HELDOUT))
    assert [p.instruction for p in every] == split.heldout
    assert not {p.instruction for p in every} & set(split.train)
    assert len(prompts) == N_PROMPTS and {p.instruction for p in prompts} <= set(split.heldout)
    assert ev.load_eval_prompts("builtin:prompts", heldout_fraction=HELDOUT, limit=2) == every[:2]


def test_alpaca_style_prompt_file(tmp_path):
    rows = [
        {"instruction": "Name a prime.", "output": "2", "generator": "ref", "dataset": "helpful_base"},
        {"instruction": "Name a prime.", "output": "3", "generator": "ref", "dataset": "helpful_base"},
        {"instruction": "  ", "output": "", "generator": "ref", "dataset": "koala"},
        {"instruction": "Say hi.  ", "output": "hi", "generator": "ref", "dataset": "oasst"},
        {"instruction": "Count to 3.", "output": "1 2 3", "generator": "ref"},
    ]
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(rows))
    got = ev.load_eval_prompts(str(path))
    # exact instruction text (AlpacaEval matches outputs by it), duplicates and blanks dropped, datasets kept
    assert got == [
        ev.EvalPrompt("Name a prime.", "helpful_base"),
        ev.EvalPrompt("Say hi.  ", "oasst"),
        ev.EvalPrompt("Count to 3.", None),
    ]
    assert ev.load_eval_prompts(str(path), limit=1) == got[:1]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in ("a?", "b?")) + "\n")
    assert [p.instruction for p in ev.load_eval_prompts(str(jsonl))] == ["a?", "b?"]
    for spec, kw, match in [
        (str(path), {"limit": 0}, "--limit"),
        (str(path), {"heldout_fraction": 1.5}, "--heldout-fraction"),
        (str(tmp_path / "missing.jsonl"), {}, "does not exist"),
    ]:
        with pytest.raises(CmeError, match=match):
            ev.load_eval_prompts(spec, **kw)


def test_outputs_file_policy_and_output_cache(tmp_path, prompts):
    """A side with fixed outputs: written in AlpacaEval format, reused, redone when the prompts change."""
    ref = tmp_path / "reference.json"
    ref.write_text(
        json.dumps(
            [{"instruction": p.instruction, "output": f"ref {i}", "generator": "gpt"} for i, p in enumerate(prompts)]
        )
    )
    policy = ev.load_policy(str(ref))
    assert policy.name == "gpt" and policy.fixed_outputs is not None
    side = ev.side_outputs(policy, prompts, tmp_path / "baseline")
    assert side.outputs == ["ref 0", "ref 1", "ref 2"] and not side.reused and side.stopped is None
    assert check_outputs(tmp_path, prompts, "baseline", "gpt") == side.outputs
    again = ev.side_outputs(policy, prompts, tmp_path / "baseline")
    assert again.reused and again.outputs == side.outputs
    fewer = ev.side_outputs(policy, prompts[:2], tmp_path / "baseline")
    assert not fewer.reused and len(read_json(tmp_path / "baseline" / "model_outputs.json")) == 2
    with pytest.raises(CmeError, match="has no output for 1 of the 4 prompts"):
        ev.side_outputs(policy, [*prompts, ev.EvalPrompt("Something new.")], tmp_path / "other")


def test_conversation_rendering(smollm, gemma):
    from tiny_hf import tiny_tokenizer

    conv = [
        {"role": "system", "content": "Be fair."},
        {"role": "user", "content": "Pick one."},
        {"role": "assistant", "content": "Hmm."},
        {"role": "user", "content": "Verdict only."},
    ]
    tok = smollm.tokenizer
    text = tokens.render_conversation(tok, conv)
    assert text == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # Gemma's tokenizer adds <bos> to plain text: a rendered chat text that spells it out loses it,
    # so the sampler's plain encoding reproduces the chat ids exactly.
    gtok = gemma.tokenizer
    chat_text = gtok.bos_token + "<start_of_turn>user\nhi<end_of_turn>\n"
    plain = tokens.as_verbatim_prompt(gtok, chat_text, chat=True)
    assert plain == chat_text[len(gtok.bos_token) :]
    assert gtok(plain)["input_ids"] == gtok(chat_text, add_special_tokens=False)["input_ids"]
    # no chat template: a plain transcript that ends where the judge answers
    transcript = tokens.render_conversation(gtok, conv)
    assert transcript.startswith("Be fair.\n\nUser: Pick one.") and transcript.endswith(
        "User: Verdict only.\n\nAssistant:"
    )
    # a template that refuses system turns gets the system text folded into the first user turn
    strict = tiny_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + strict.chat_template
    )
    folded = tokens.render_conversation(strict, conv)
    assert folded.startswith("<|im_start|>user\nBe fair.\n\nPick one.<|im_end|>") and folded.endswith("assistant\n")


# ----------------------------------------------------------------------------------------------------------
# End to end with real models


@pytest.mark.slow
def test_run_directory_vs_base_with_local_judge_and_cme(trained_run, smollm, gemma, prompts, tmp_path):
    run, params = trained_run
    out = tmp_path / "eval"
    model = ev.load_policy(str(run))
    assert model.name == "run@7" and model.source == f"{run.resolve()}@7" and model.model is None
    base = ev.load_policy("smollm2-135m-instruct", model=smollm)
    judge = CountingJudge(judging.local_judge(smollm, max_new_tokens=JUDGE_TOKENS, batch_size=JUDGE_BATCH))
    vcfg = VerifierConfig("gemma3-270m", context="plain", template=GEMMA_TEMPLATE)
    verifier = Verifier.from_model(vcfg, gemma)
    kw = dict(
        sampling=SAMPLING,
        verifiers=[verifier],
        batch_size=N_PROMPTS,
        retries_unparsed=0,
        prompt_source="builtin:prompts",
    )
    results = ev.evaluate(model, base, prompts, judge, out, **kw)

    check_results(out, results, N_PROMPTS)
    assert results["model"] == "run@7" and results["baseline"] == "smollm2-135m-instruct"
    assert "smollm2-135m-instruct" in results["judge"] and f"max_new_tokens={JUDGE_TOKENS}" in results["judge"]
    assert judge.asked > 0
    model_out = check_outputs(out, prompts, "model", "run@7")
    base_out = check_outputs(out, prompts, "baseline", "smollm2-135m-instruct")

    # The run's outputs are those of the checkpoint's weights, prompted as the run's config says: the base
    # model's chat template with the recorded system prompt.
    assert model.system_prompt == SYSTEM and base.system_prompt is None
    trained = dataclasses.replace(smollm, weights=params)
    chats = [format_prompt(smollm.tokenizer, p.instruction, system=SYSTEM) for p in prompts]
    want = generate_responses(trained, chats, SAMPLING, fmt="plain", template="{prompt}", batch_size=N_PROMPTS)
    assert model_out == [s[0]["response"].strip() for s in want]
    restored = checkpoint.load_run_model(checkpoint.inspect_run(run), dtype="float32")
    assert restored.spec == model.source and restored.cfg == smollm.cfg
    jax.tree.map(np.testing.assert_array_equal, restored.weights, params)

    # Automatic metrics: CME exactly as cme_jax.score computes it for the written outputs.
    auto = results["automatic"]
    assert [v["name"] for v in auto["verifiers"]] == ["gemma3-270m"]
    instructions = [p.instruction for p in prompts]
    rows = [json.loads(line) for line in (out / "automatic.jsonl").read_text().splitlines()]
    for side, texts in (("model", model_out), ("baseline", base_out)):
        direct = score_texts(Verifier.from_model(vcfg, gemma), instructions, texts)
        assert not direct.empty.any() and np.isfinite(direct.mean).all()
        assert auto[side]["cme_gemma3-270m"] == pytest.approx(float(direct.mean.astype(np.float64).mean()), abs=1e-6)
        assert auto[side]["cme"] == pytest.approx(auto[side]["cme_gemma3-270m"], abs=1e-6)
        assert [r[f"{side}_cme_gemma3-270m"] for r in rows] == pytest.approx(direct.mean.tolist(), abs=1e-6)
        assert auto[side]["distinct_2"] == pytest.approx(distinct_2(texts))
        assert auto[side]["mean_length_characters"] == pytest.approx(np.mean([len(t) for t in texts]))
        assert auto[side]["mean_length_words"] == pytest.approx(np.mean([len(t.split()) for t in texts]))
    assert auto["model"]["mean_length_tokens"] == pytest.approx(np.mean([len(s[0]["tokens"]) for s in want]))
    assert auto["model"]["stopped_rate"] == pytest.approx(np.mean([s[0]["stopped"] for s in want]))
    diff = np.array([r["model_cme"] - r["baseline_cme"] for r in rows])
    assert auto["cme_win_rate"] == pytest.approx(np.mean((diff > 0) + 0.5 * (diff == 0)))
    assert "CME under `gemma3-270m`" in (out / "report.md").read_text()

    # A rerun reuses the outputs (no model loads) and every judgment (no judge call).
    again_model = ev.load_policy(str(run))
    loads = []
    again_model.loader = lambda: loads.append(1)
    again_judge = CountingJudge(judge.inner)
    again = ev.evaluate(again_model, base, prompts, again_judge, out, **kw)
    assert again == results and not loads and again_judge.asked == 0


class ModelServer(ChatServer):
    """The chat-completions server answering with a cme_jax model's own generations.

    It renders each conversation with the model's chat template itself and generates greedily through
    `generate_responses`. `fail_first` fails the first attempt of two conversations in three (HTTP 500, then
    429, then none, in turn).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.generate_lock = threading.Lock()
        self.fail_first = True
        self.first_seen = 0

    def fault(self, h, conv, attempt):
        if attempt != 1:
            return False
        with self.lock:
            self.first_seen += 1
            turn = self.first_seen % 3
        if not self.fail_first or turn == 0:
            return False
        self.send(h, 500 if turn == 1 else 429, {"error": {"message": "try again"}}, [("Retry-After", "0")])
        return True

    def reply(self, body):
        tok = self.model.tokenizer
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        with self.generate_lock:  # one generation at a time; a full batch of 2 keeps the compiled shapes few
            out = generate_responses(
                self.model,
                [text, text],
                SamplingConfig(max_new_tokens=int(body.get("max_tokens", 16)), temperature=0.0),
                fmt="plain",
                template="{prompt}",
                batch_size=JUDGE_BATCH,
            )
        return out[0][0]["response"].strip()


@pytest.fixture
def model_server(smollm, monkeypatch):
    no_proxy(monkeypatch)
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = ModelServer(smollm)
    yield server
    server.close()


@pytest.mark.slow
def test_gemma_vs_smollm_with_http_judge_retries_and_resume(model_server, smollm, gemma, prompts, tmp_path):
    out = tmp_path / "eval"
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"instruction": p.instruction}) + "\n" for p in prompts))
    assert ev.load_eval_prompts(str(prompt_file)) == prompts

    def judge():
        return OpenAIJudge(
            base_url=model_server.base_url,
            model="smollm-judge",
            api_key_env=KEY_ENV,
            max_concurrency=2,
            max_retries=2,
            backoff=0.01,
            max_tokens=JUDGE_TOKENS,
        )

    def policies():
        # One template for both, as the CLI's --template gives it; SmolLM2 uses its chat template anyway.
        return (
            ev.load_policy("gemma3-270m", model=gemma, template=GEMMA_TEMPLATE),
            ev.load_policy("smollm2-135m-instruct", model=smollm, template=GEMMA_TEMPLATE),
        )

    kw = dict(sampling=SAMPLING, batch_size=N_PROMPTS, retries_unparsed=0, prompt_source=str(prompt_file))
    # The endpoint dies after 2 answers: the run fails with one line, keeping what was answered.
    model_server.down_after = 2
    with pytest.raises(CmeError, match="rerun the same command to resume") as e:
        ev.evaluate(*policies(), prompts, judge(), out, **kw)
    assert "\n" not in str(e.value) and SECRET not in str(e.value)
    assert len(model_server.answered) == 2
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 2

    # The rerun resumes: first attempts of most conversations fail (500, 429) and are retried.
    model_server.down_after = None
    results = ev.evaluate(*policies(), prompts, judge(), out, **kw)
    check_results(out, results, N_PROMPTS)
    gemma_out = check_outputs(out, prompts, "model", "gemma3-270m")
    check_outputs(out, prompts, "baseline", "smollm2-135m-instruct")
    want = generate_responses(
        gemma, [p.instruction for p in prompts], SAMPLING, template=GEMMA_TEMPLATE, batch_size=N_PROMPTS
    )
    assert gemma_out == [s[0]["response"].strip() for s in want]
    assert {500, 429} <= set(model_server.statuses)
    assert len(model_server.answered) == len(set(model_server.answered))  # nothing answered twice
    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    asked = sum(
        len(r["judge_output_model_as_a"]) + len(r["judge_output_model_as_b"])
        for r in records
        if r["judge_output_model_as_a"] != [IDENTICAL_NOTE]
    )
    assert len(model_server.answered) == asked
    assert model_server.auth and all(a == f"Bearer {SECRET}" for a in model_server.auth)
    auto = results["automatic"]
    assert auto["verifiers"] == [] and not (out / "automatic.jsonl").exists()
    assert auto["model"]["distinct_2"] == pytest.approx(distinct_2(gemma_out))

    # A third run asks nothing; so does the command line on the same OUT, and it loads no policy.
    before = model_server.requests
    assert ev.evaluate(*policies(), prompts, judge(), out, **kw) == results
    evaluate_cmd.main(
        [
            "--model", "gemma3-270m", "--baseline", "smollm2-135m-instruct", "--template", GEMMA_TEMPLATE,
            "--prompts", str(prompt_file),
            "--max-new-tokens", str(SAMPLING.max_new_tokens), "--retries-unparsed", "0",
            "--judge-url", model_server.base_url, "--judge-name", "smollm-judge", "--judge-key-env", KEY_ENV,
            "--judge-max-tokens", str(JUDGE_TOKENS), "--out", str(out),
        ]
    )  # fmt: skip
    assert model_server.requests == before
    cli = read_json(out / "results.json")
    assert {k: cli[k] for k in EVAL_RESULT_KEYS} == {k: results[k] for k in EVAL_RESULT_KEYS}
    assert cli["prompts"] == {"source": str(prompt_file), "count": N_PROMPTS}
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any model loads


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    with CheckpointManager(run) as mngr:
        mngr.save(4, {"params": jnp.zeros(2)}, {"model_spec": "smollm2-135m-instruct"})
    monkeypatch.delenv("CME_EVAL_MISSING_KEY", raising=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi?"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "  "}\n')
    bare = tmp_path / "bare_run"
    bare.mkdir()
    (bare / "config.yaml").write_text("run_dir: x\n")
    url = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-name", "j", "--judge-no-key"]
    base = ["--baseline", "smollm2-135m-instruct", "--prompts", str(prompts), "--out", str(tmp_path / "o")]

    def fails(*argv: str) -> str:
        return cli_error(capsys, evaluate_cmd.main, argv)

    assert "exactly one judge" in fails("--model", "smollm2-135m-instruct", *base)
    assert "exactly one judge" in fails("--model", "x", *base, *url, "--judge-model", "smollm2-135m-instruct")
    assert "--judge-name" in fails("--model", "x", *base, "--judge-url", "http://127.0.0.1:9/v1")
    assert "http://" in fails("--model", "x", *base, "--judge-url", "127.0.0.1:9/v1", "--judge-name", "j")
    assert "not with --judge-model" in fails("--model", "x", *base, "--judge-model", "y", "--judge-name", "j")
    missing_key = [
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--judge-name",
        "j",
        "--judge-key-env",
        "CME_EVAL_MISSING_KEY",
    ]
    assert "CME_EVAL_MISSING_KEY is not set" in fails("--model", "x", *base, *missing_key)
    assert "does not exist" in fails("--model", str(tmp_path / "missing_run"), *base, *url)
    assert "neither an existing path" in fails("--model", "no-such-model", *base, *url)
    assert "no checkpoints/ yet" in fails("--model", str(bare), *base, *url)
    assert "must be a number" in fails("--model", f"{run}@last", *base, *url)
    assert "step 9 has no complete checkpoint" in fails("--model", f"{run}@9", *base, *url)
    assert "outputs file" in fails("--model", str(tmp_path / "outs.json"), *base, *url)
    out = str(tmp_path / "o")
    assert "holds no records" in fails("--model", "x", *base[:2], "--prompts", str(empty), "--out", out, *url)
    assert "no prompts left" in fails("--model", "x", *base[:2], "--prompts", str(blank), "--out", out, *url)
    assert "--limit" in fails("--model", "x", *base, *url, "--limit", "0")
    assert "temperature" in fails("--model", "x", *base, *url, "--temperature", "-1")
    assert "is a file" in fails("--model", "x", *base[:-1], str(prompts), *url)


def test_command_line_bad_input_exit_code(tmp_path):
    args = ["--model", "a", "--baseline", "b", "--prompts", "x.jsonl", "--out", "o"]
    proc = run_module("cme_jax.evaluate", *args, cwd=tmp_path, timeout=120)
    assert assert_one_line_error(proc.returncode, proc.stderr) == (
        "error: give exactly one judge: --judge-model SPEC (run locally) or --judge-url URL with --judge-name MODEL"
    )


# ----------------------------------------------------------------------------------------------------------
# Likelihood verdicts, judge audit, early stop, automatic-only evaluation

LIKELIHOOD_CASES = [
    ("What is 2 + 2?", "2 + 2 = 4.", "It is 5."),
    ("Name a colour.", "Blue.", "A colour is how we see light; blue, red and green are colours, among many others."),
]


def likelihood_conversations():
    """Both orders of each case, as run_pairwise renders them for a verdict-only judge."""
    return [render_pairwise(q, a, b, verdict_only=True) for q, a, b in LIKELIHOOD_CASES] + [
        render_pairwise(q, b, a, verdict_only=True) for q, a, b in LIKELIHOOD_CASES
    ]


def hf_logprobs(hf_model, ids):
    """float64 log-softmax of transformers' logits at every position of one row."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


REPLY = re.compile(r"\[\[([AB])\]\] \(log p A=(-?[\d.]+), B=(-?[\d.]+)\)")


def test_likelihood_judge_matches_transformers(smollm, hf_smollm, gemma):
    convs = likelihood_conversations()  # 4 conversations of about 200 tokens: one batch of 4
    judge = judging.local_judge(smollm, verdict="likelihood", batch_size=4)
    assert judge.verdict_only and "|likelihood|" in judge.judge_id
    assert judge.judge_id != judging.local_judge(smollm).judge_id  # the two modes never share cached judgments
    replies = judge.judge(convs)
    got = np.array([[float(x) for x in REPLY.fullmatch(r).groups()[1:]] for r in replies])
    tok = smollm.tokenizer
    for conv, reply, lp in zip(convs, replies, got):
        text = judging.verdict_prompt(tok, conv)
        assert text == tokens.render_conversation(tok, conv) + "[[" and text.endswith("<|im_start|>assistant\n[[")
        ids = tok(text)["input_ids"]
        letters = []
        for letter in "AB":
            with_letter = tok(text + letter)["input_ids"]
            assert with_letter[:-1] == ids  # one token after the prefix
            letters.append(with_letter[-1])
        ref = hf_logprobs(hf_smollm, ids)[-1, letters]
        np.testing.assert_allclose(lp, ref, atol=1e-3)
        assert parse_verdict(reply) == "AB"[int(np.argmax(ref))]
    # the same numbers and verdicts in batches of one (left padding, no repeated rows)
    single = judging.verdict_logprobs(smollm, convs, batch_size=1)
    np.testing.assert_allclose(single, got, atol=2e-4)
    assert [judging.likelihood_reply(row)[:5] for row in single] == [r[:5] for r in replies]
    # the fallback for letters of several tokens: the summed log-prob of each continuation
    text = judging.verdict_prompt(tok, convs[0])
    np.testing.assert_allclose(
        judging.continuation_logprobs(smollm, [text], ["A", "B"], batch_size=2)[0], got[0], atol=2e-4
    )
    multi = judging.verdict_logprobs(smollm, convs[:1], letters=("A]]", "B]]"), batch_size=2)
    ids = tok(text)["input_ids"]
    for k, cont in enumerate(("A]]", "B]]")):
        full = tok(text + cont)["input_ids"]
        assert full[: len(ids)] == ids and len(full) == len(ids) + 2  # "A", "]]": two tokens
        ref = hf_logprobs(hf_smollm, full)
        assert multi[0, k] == pytest.approx(ref[len(ids) - 1, full[-2]] + ref[len(ids), full[-1]], abs=1e-3)
    # a judge without a chat template continues the plain transcript
    assert judging.verdict_prompt(gemma.tokenizer, convs[0]).endswith("\n\nAssistant: [[")
    assert judging.likelihood_reply([-0.31, -1.42]) == "[[A]] (log p A=-0.3100, B=-1.4200)"
    assert parse_verdict(judging.likelihood_reply([-2.0, -0.5])) == "B"
    with pytest.raises(CmeError, match="not one of generate, likelihood"):
        judging.local_judge(smollm, verdict="sample")


def outputs_file(path: Path, prompts, outputs, generator: str) -> Path:
    rows = [{"instruction": p.instruction, "output": o, "generator": generator} for p, o in zip(prompts, outputs)]
    path.write_text(json.dumps(rows))
    return path


def fixed_sides(tmp_path, prompts):
    """Two policies with fixed outputs (no model loads): the model's answers are the longer ones."""
    model = outputs_file(
        tmp_path / "m.json", prompts, [f"a longer answer, number {i}" for i in range(len(prompts))], "m"
    )
    base = outputs_file(tmp_path / "b.json", prompts, ["short"] * len(prompts), "b")
    return model, base


def counting(judge: FunctionJudge) -> tuple[FunctionJudge, list]:
    """The judge with every conversation it is asked recorded."""
    asked: list = []
    inner = judge.fn
    judge.fn = lambda convs: asked.extend(convs) or inner(convs)
    return judge, asked


def instruction_of(messages) -> str:
    return re.search(r"<instruction>\n(.*?)\n</instruction>", messages[1]["content"], re.S).group(1)


def test_judge_audit_in_evaluation(tmp_path, prompts):
    model_file, base_file = fixed_sides(tmp_path, prompts)
    pairs = shipped_pairs()[:6]
    chosen = {p.chosen for p in pairs}

    def sides():
        return ev.load_policy(str(model_file)), ev.load_policy(str(base_file))

    out = tmp_path / "eval"
    kw = dict(audit_pairs=6, retries_unparsed=0, progress=False)
    always_a, asked = counting(FunctionJudge(lambda c: ["[[A]]"] * len(c), judge_id="always-a"))
    results = ev.evaluate(*sides(), prompts, always_a, out, **kw)
    check_results(out, results, N_PROMPTS)
    audit = results["judge_audit"]
    assert (audit["pairs"], audit["n"], audit["unparsed"]) == (6, 6, 0)
    assert audit["accuracy"] == 0.5 and (audit["ci95_low"], audit["ci95_high"]) == (0.5, 0.5)
    assert audit["position_consistency"] == 0.0 and audit["first_position_rate"] == 1.0
    assert results["win_rate_tie_adjusted"] == 0.5  # every pair a split verdict
    # the audit ran first, through the same cache
    assert [instruction_of(m) for m in asked[:12]] == [p.prompt for p in pairs for _ in range(2)]
    assert {instruction_of(m) for m in asked[12:]} == {p.instruction for p in prompts} and len(asked) == 18
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 18
    lines = (out / "report.md").read_text().splitlines()
    audit_line = next(i for i, x in enumerate(lines) if x.startswith("**Judge audit:**"))
    assert lines[audit_line - 2].startswith("Judged in both orders") and lines[audit_line + 2] == "| metric | value |"
    assert "judge accuracy on 6 shipped preference pairs" in lines[audit_line]
    assert "**50.0%** [50.0%, 50.0%]" in lines[audit_line] and "position consistency 0.0%" in lines[audit_line]
    assert "cannot reliably tell a better answer from a worse one" in lines[audit_line]
    # a rerun asks nothing
    asked.clear()
    assert ev.evaluate(*sides(), prompts, always_a, out, **kw) == results and asked == []

    def knows_chosen(convs):
        return ["[[A]]" if re.search(r"<response_a>\n(.*?)\n</response_a>", m[1]["content"], re.S).group(1) in chosen
                else "[[B]]" for m in convs]  # fmt: skip

    perfect = FunctionJudge(knows_chosen, judge_id="knows-chosen")
    good = ev.evaluate(*sides(), prompts, perfect, tmp_path / "eval2", **kw)
    assert good["judge_audit"]["accuracy"] == 1.0 and good["judge_audit"]["position_consistency"] == 1.0
    report = (tmp_path / "eval2" / "report.md").read_text()
    assert "**100.0%** [100.0%, 100.0%]" in report and "a judge near 50% cannot separate the policies" in report
    # an audit computed once elsewhere is written as given, without asking the judge about the pairs again
    reused, asked = counting(FunctionJudge(lambda c: ["[[B]]"] * len(c), judge_id="always-b"))
    again = ev.evaluate(*sides(), prompts, reused, tmp_path / "eval3", audit=good["judge_audit"], progress=False)
    assert again["judge_audit"] == good["judge_audit"] and len(asked) == 2 * N_PROMPTS
    with pytest.raises(CmeError, match="between 0 and 48"):
        ev.evaluate(*sides(), prompts, reused, tmp_path / "eval4", audit_pairs=49, progress=False)
    with pytest.raises(CmeError, match="needs a judge"):
        ev.evaluate(*sides(), prompts, None, tmp_path / "eval4", audit_pairs=2, progress=False)


def test_evaluation_stops_early_on_an_unusable_judge(tmp_path):
    prompts = [ev.EvalPrompt(f"Question number {i}?") for i in range(12)]
    model_file, base_file = fixed_sides(tmp_path, prompts)
    out = tmp_path / "eval"
    mute, asked = counting(FunctionJudge(lambda c: ["I like both."] * len(c), judge_id="mute"))
    with pytest.raises(CmeError) as e:
        ev.evaluate(
            ev.load_policy(str(model_file)), ev.load_policy(str(base_file)), prompts, mute, out,
            retries_unparsed=1, progress=False,
        )  # fmt: skip
    msg = str(e.value)
    assert "\n" not in msg and "8 of the first 8 pairs" in msg and "--judge-verdict likelihood" in msg
    assert f"32 finished judgments are cached in {out / 'judge_cache.jsonl'}" in msg and "resume" not in msg
    assert len(asked) == 8 * 2 * 2 and {instruction_of(m) for m in asked} == {p.instruction for p in prompts[:8]}
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 32
    assert not (out / "results.json").exists()
    # the audit stops the same way, before any evaluation pair is asked
    asked.clear()
    with pytest.raises(CmeError, match="8 of the first 8 pairs"):
        ev.evaluate(
            ev.load_policy(str(model_file)), ev.load_policy(str(base_file)), prompts, mute, tmp_path / "audited",
            retries_unparsed=0, audit_pairs=20, progress=False,
        )  # fmt: skip
    assert len(asked) == 16 and {instruction_of(m) for m in asked} == {p.prompt for p in shipped_pairs()[:8]}


def test_no_judge_end_to_end(tmp_path, prompts, capsys):
    model_file, base_file = fixed_sides(tmp_path, prompts[:2])
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"instruction": p.instruction}) + "\n" for p in prompts[:2]))
    out = tmp_path / "eval"
    # an earlier judged run in the same OUT: its judgments must not outlive it
    judge = FunctionJudge(lambda c: ["[[A]]"] * len(c), judge_id="always-a")
    ev.evaluate(
        ev.load_policy(str(model_file)), ev.load_policy(str(base_file)), prompts[:2], judge, out, progress=False
    )
    assert (out / "judgments.jsonl").is_file() and (out / "report.png").is_file()
    argv = ["--model", str(model_file), "--baseline", str(base_file), "--prompts", str(prompt_file)]
    evaluate_cmd.main([*argv, "--no-judge", "--out", str(out)])
    results = read_json(out / "results.json")
    assert results["judge"] is None and results["model"] == "m" and results["baseline"] == "b"
    for key in ("win_rate_tie_adjusted", "n", "wins", "judge_audit"):
        assert key not in results
    assert results["prompts"] == {"source": str(prompt_file), "count": 2}
    auto = results["automatic"]
    model_out = check_outputs(out, prompts[:2], "model", "m")
    assert auto["model"]["distinct_2"] == pytest.approx(distinct_2(model_out))
    assert auto["model"]["mean_length_characters"] == pytest.approx(np.mean([len(t) for t in model_out]))
    report = (out / "report.md").read_text()
    assert report.startswith("# m vs b\n") and "No judge was run" in report and "## Automatic metrics" in report
    assert "win rate of" not in report
    assert not (out / "judgments.jsonl").exists() and not (out / "report.png").exists()
    assert "no judge, automatic metrics only" in capsys.readouterr().err


def test_judge_flags_are_one_line_errors(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi?"}\n')
    base = ["--model", "x", "--baseline", "y", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    url = ["--judge-url", "http://127.0.0.1:9/v1", "--judge-name", "j", "--judge-no-key"]
    local = ["--judge-model", "smollm2-135m-instruct"]

    def fails(*argv: str) -> str:
        return cli_error(capsys, evaluate_cmd.main, [*base, *argv])

    assert "exclude each other" in fails("--no-judge", *local)
    assert "exclude each other" in fails("--no-judge", "--judge-url", "http://127.0.0.1:9/v1")
    assert "--judge-audit needs a judge" in fails("--no-judge", "--judge-audit", "4")
    assert "--judge-verdict needs a judge" in fails("--no-judge", "--judge-verdict", "likelihood")
    assert "--judge-max-tokens needs a judge" in fails("--no-judge", "--judge-max-tokens", "3")
    assert "--judge-no-key needs a judge" in fails("--no-judge", "--judge-no-key")
    assert "needs a local judge (--judge-model)" in fails(*url, "--judge-verdict", "likelihood")
    assert "must be one of generate, likelihood" in fails(*local, "--judge-verdict", "maybe")
    assert "goes with --judge-verdict generate" in fails(
        *local, "--judge-verdict", "likelihood", "--judge-max-tokens", "4"
    )
    assert "between 0 and 48" in fails(*url, "--judge-audit", "49")
    assert "between 0 and 48" in fails(*local, "--judge-audit", "-1")
