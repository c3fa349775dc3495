"""Head-to-head evaluation of two policies: generate, judge every pair in both orders, score CME, report.

    python -m cme_jax.evaluate --model runs/demo_cpu --baseline smollm2-135m-instruct \
        --prompts builtin:prompts --heldout-fraction 0.05 --max-new-tokens 128 \
        --judge-model smollm2-135m-instruct \
        --verifier gemma3-270m --verifier-context plain --verifier-template "Question: {prompt}\nAnswer:" \
        --out runs/demo_cpu/eval
    JUDGE_KEY=... python -m cme_jax.evaluate --model runs/my_run@400 --baseline Qwen/Qwen2.5-0.5B-Instruct \
        --prompts alpaca_eval --judge-url https://api.openai.com/v1 --judge-name gpt-4o \
        --judge-key-env JUDGE_KEY --out eval/my_run

Policies (`--model`, `--baseline`): any model spec cme_jax loads (Hub id, local directory, .gguf file,
embedded alias); a training run directory, `RUN_DIR` (latest checkpoint) or `RUN_DIR@STEP`, whose policy
weights are restored on top of the model spec and prompt format recorded in the checkpoint; or an
AlpacaEval outputs file (`.json`/`.jsonl` with `instruction` and `output`), e.g. AlpacaEval 2.0's GPT-4
Turbo reference outputs, used as they are.

Prompts (`--prompts`): `alpaca_eval` (AlpacaEval 2.0's 805 instructions, fetched from the Hub dataset
tatsu-lab/alpaca_eval, or read from the local Hugging Face cache), any source `cme_jax.prompts` reads
(`builtin:prompts`, a `.json`/`.jsonl`/`.parquet` file with an `instruction` or `prompt` field, a Hub
dataset). `--heldout-fraction F` keeps only the prompts a training run with `data.heldout_fraction: F`
held out. Generation is greedy unless `--temperature` is set.

Judges: `--judge-model SPEC` runs any model cme_jax loads locally (its chat template, else a plain
transcript), or `--judge-url URL --judge-name MODEL` calls an OpenAI-compatible chat completions endpoint,
with the API key read from the environment variable `--judge-key-env` names (default OPENAI_API_KEY).
Verdicts, the both-orders protocol and the cache are those of `cme_jax.judging`. A local judge's
`--judge-verdict` is `generate` (default: it writes a reply greedily and the verdict is parsed from it) or
`likelihood` (no generation: it is asked for the verdict only, its reply is prefilled with "[[" and the
verdict is whichever of A and B has the higher next-token log-prob; it never leaves a verdict unparsed, and
the reply kept in judgments.jsonl reads `[[A]] (log p A=-0.31, B=-1.42)`). Small local judges often cannot
write a parseable verdict: when more than half of the first 8 pairs stay unparsed, the run stops with one
line instead of spending the whole budget. `--judge-audit N` first scores the judge itself on the first N
of the 48 shipped preference pairs (`cme_jax/data/preference_pairs.jsonl`), both orders, same cache: its
accuracy (how often it prefers the better answer) with a 95% interval, per-order accuracy and position
consistency go into results.json (`judge_audit`) and beside the win rate in report.md, since a win rate
means little from a judge near 50%. `--no-judge` skips judging: generation and the automatic metrics only,
no win rate.

Everything lands in OUT: `model/model_outputs.json` and `baseline/model_outputs.json` (AlpacaEval's
format, so `alpaca_eval --model_outputs OUT/model/model_outputs.json --reference_outputs
OUT/baseline/model_outputs.json` works on them too), `judge_cache.jsonl`, `judgments.jsonl`,
`results.json`, `report.md`, `report.png` and, with `--verifier`, `automatic.jsonl` (per-prompt CME);
`--no-judge` writes no `judgments.jsonl` or `report.png`.
Each side's `generation.json` records what produced its outputs; a rerun reuses outputs whose record
matches (unless `--regenerate`) and every cached judgment, so an interrupted evaluation resumes where it
stopped without generating or paying for a judgment twice. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cme_jax.audit import FORMS, form_scores, score_forms
from cme_jax.checkpoint import CheckpointManager, checkpoint_dir
from cme_jax.cli import add_verifier_args, verifier_reward
from cme_jax.errors import CmeError, cli_main
from cme_jax.generate import generate_responses
from cme_jax.judging import (
    EARLY_STOP_PAIRS,
    FunctionJudge,
    Judge,
    JudgmentCache,
    Message,
    OpenAIJudge,
    PairItem,
    UnusableJudgeError,
    audit_sentence,
    bootstrap_ci,
    judge_audit,
    read_model_outputs,
    render_pairwise,
    run_pairwise,
    summarize_records,
    write_model_outputs,
    write_results,
)
from cme_jax.metrics import distinct_n, repetition_rate
from cme_jax.prompts import clean_prompt, heldout_score, prompt_key, read_prompt_texts
from cme_jax.rewards import RewardInputs, cme_config, combine_host
from cme_jax.sampling import SamplingConfig
from cme_jax.scoring import (
    Verifier,
    VerifierConfig,
    VerifierDtype,
    default_verifier_name,
    load_verifier,
    resolve_dtype,
)
from cme_jax.sources import LoadedModel, load_model
from cme_jax.tokens import DEFAULT_PLAIN_TEMPLATE, PromptFormat, format_prompt, has_chat_template

Side = Literal["model", "baseline"]
SIDES: tuple[Side, ...] = ("model", "baseline")

ALPACA_EVAL_SPECS = ("alpaca_eval", "tatsu-lab/alpaca_eval", "hf:tatsu-lab/alpaca_eval")
ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval.json"
OUTPUTS_FILE = "model_outputs.json"
SETTINGS_FILE = "generation.json"
DEFAULT_SAMPLING = SamplingConfig(max_new_tokens=512, temperature=0.0)
# Plain prompts go through `generate_responses` verbatim: the caller has already formatted them.
VERBATIM_TEMPLATE = "{prompt}"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """One evaluation instruction and, when the source names it, its AlpacaEval sub-dataset."""

    instruction: str
    dataset: str | None = None


def fetch_alpaca_eval() -> Path:
    """Local path of AlpacaEval 2.0's instruction file (Hub download, or the cache when offline)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ALPACA_EVAL_REPO, ALPACA_EVAL_FILE, repo_type="dataset"))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CmeError(
            f"cannot fetch {ALPACA_EVAL_FILE} from the Hub dataset {ALPACA_EVAL_REPO} ({first}); download it once "
            "with network access, or pass a local copy as --prompts alpaca_eval.json"
        ) from None


def _dataset_names(path: Path, n: int) -> list[str | None]:
    """The `dataset` field of each record of a .json/.jsonl prompt file, aligned with its prompts; else Nones."""
    none: list[str | None] = [None] * n
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return none
    try:
        text = path.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):  # an object of columns
            data = [{"dataset": d} for d in data.get("dataset", [None] * n)]
        names = [row.get("dataset") if isinstance(row, dict) else None for row in data]
    except (ValueError, OSError):
        return none
    if len(names) != n:
        return none
    return [d if isinstance(d, str) and d else None for d in names]


def load_eval_prompts(
    spec: str,
    *,
    limit: int | None = None,
    heldout_fraction: float | None = None,
    field: str | None = None,
    split: str = "train",
) -> list[EvalPrompt]:
    """Instructions of a prompt source, de-duplicated, optionally the held-out share only, at most `limit`.

    `spec` is `alpaca_eval` or any `cme_jax.prompts` source. Instructions keep their exact text (the
    official AlpacaEval tool matches outputs to its set by instruction); duplicates and the held-out split
    use the same whitespace-insensitive key as training, so `heldout_fraction` selects exactly the prompts
    a run with that `data.heldout_fraction` never trained on.
    """
    if limit is not None and limit < 1:
        raise CmeError(f"--limit must be >= 1, got {limit}")
    if heldout_fraction is not None and not 0.0 < heldout_fraction < 1.0:
        raise CmeError(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}")
    source = spec.strip()
    if source in ALPACA_EVAL_SPECS:
        source = str(fetch_alpaca_eval())
    texts = read_prompt_texts(source, split=split, field=field)
    datasets = _dataset_names(Path(source).expanduser(), len(texts))
    out: list[EvalPrompt] = []
    seen: set[str] = set()
    for text, dataset in zip(texts, datasets):
        if not clean_prompt(text):
            continue
        key = prompt_key(text)
        if key in seen:
            continue
        seen.add(key)
        if heldout_fraction is not None and heldout_score(text) >= heldout_fraction:
            continue
        out.append(EvalPrompt(text, dataset))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        where = f" with heldout fraction {heldout_fraction}" if heldout_fraction is not None else ""
        raise CmeError(f"no prompts left from {spec}{where}; give a source with at least one non-empty instruction")
    return out


# ----------------------------------------------------------------------------------------------------------
# Policies: model specs, training run directories, fixed output files


def parse_run_spec(spec: str) -> tuple[Path, int | None] | None:
    """(run directory, step or None for the latest) when `spec` names a training run, else None."""
    path = Path(spec).expanduser()
    if path.is_dir() and checkpoint_dir(path).is_dir():
        return path, None
    head, sep, tail = spec.rpartition("@")
    if sep and head:
        run = Path(head).expanduser()
        if run.is_dir() and checkpoint_dir(run).is_dir():
            if not tail.isdigit():
                raise CmeError(f"{spec!r}: the step after '@' must be a number, e.g. {head}@100")
            return run, int(tail)
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise CmeError(f"run directory {path} has no {checkpoint_dir(path).name}/ yet; train until the first save")
    return None


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """A training run's checkpoint: where, which step, the base model spec and the recorded config."""

    run_dir: Path
    step: int
    model_spec: str
    config: dict[str, Any]

    @property
    def source(self) -> str:
        """Identifies the weights: the run directory's absolute path and the step."""
        return f"{self.run_dir.resolve()}@{self.step}"


def inspect_run(run_dir: str | Path, step: int | None = None) -> RunCheckpoint:
    """Read a run's checkpoint metadata (no weights): the step (default latest), model spec and config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CmeError(f"run directory {run_dir} does not exist; pass the directory the trainer wrote")
    with CheckpointManager(run_dir, read_only=True) as mngr:
        if mngr.latest_step() is None:
            raise CmeError(f"{checkpoint_dir(run_dir)} holds no complete checkpoint yet; train until the first save")
        meta = mngr.metadata(step)
        step = step if step is not None else mngr.latest_step()
    spec = meta.get("model_spec")
    if not isinstance(spec, str) or not spec:
        raise CmeError(
            f"checkpoint metadata in {checkpoint_dir(run_dir)} has no model_spec, so the policy cannot be rebuilt; "
            "evaluate run directories written by cme_jax.train"
        )
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    return RunCheckpoint(run_dir, int(step), spec, config)


def load_run_model(run: RunCheckpoint, *, dtype: VerifierDtype = "auto") -> LoadedModel:
    """The run's policy: architecture and tokenizer from its model spec, weights from its checkpoint."""
    import jax
    import jax.numpy as jnp

    from cme_jax.export import host_params_abstract
    from cme_jax.models.families import config_from_hf
    from cme_jax.sources import load_tokenizer, resolve

    src = resolve(run.model_spec)
    cfg = config_from_hf(src.hf_config)
    tokenizer = load_tokenizer(src)
    with CheckpointManager(run.run_dir, read_only=True) as mngr:
        # Read as float32 host arrays (exact for bf16 runs too), then cast once to the evaluation dtype.
        restored = mngr.restore({"params": host_params_abstract(cfg)}, run.step, partial=True)
    target = resolve_dtype(dtype)
    weights = jax.tree.map(lambda x: jnp.asarray(x, target), restored.state["params"])
    return LoadedModel(run.source, cfg, weights, tokenizer, src.hf_config, src)


def _is_outputs_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in (".json", ".jsonl") and not Path(spec).is_dir()


@dataclasses.dataclass
class Policy:
    """One side of the comparison: a model that generates (loaded on first use), or fixed outputs."""

    name: str  # the `generator` in model_outputs.json
    source: str  # identifies the weights (spec, or RUN_DIR@step) or the outputs file
    fmt: PromptFormat = "auto"
    template: str = DEFAULT_PLAIN_TEMPLATE
    system_prompt: str | None = None
    stop_strings: tuple[str, ...] = ()
    model: LoadedModel | None = dataclasses.field(default=None, repr=False)
    loader: Callable[[], LoadedModel] | None = dataclasses.field(default=None, repr=False)
    fixed_outputs: dict[str, str] | None = dataclasses.field(default=None, repr=False)  # instruction -> output

    def get_model(self) -> LoadedModel:
        """The loaded model, loading it now if needed."""
        if self.model is None:
            if self.loader is None:
                raise CmeError(f"policy {self.name!r} has neither a model nor a way to load one")
            self.model = self.loader()
        return self.model

    def release(self) -> None:
        """Drop a model this policy loaded itself (one passed in stays with its owner)."""
        if self.loader is not None:
            self.model = None


def _model_source(spec: str, dtype: VerifierDtype) -> tuple[str, Callable[[], LoadedModel], RunCheckpoint | None]:
    """(source id, loader, run or None) for a model spec or a run directory; checks it before any weights load."""
    from cme_jax.sources import resolve

    run_spec = parse_run_spec(spec)
    if run_spec is not None:
        run = inspect_run(*run_spec)
        resolve(run.model_spec)  # fail now on a base model that is gone
        return run.source, lambda: load_run_model(run, dtype=dtype), run
    resolve(spec)
    return spec, lambda: load_model(spec, dtype=resolve_dtype(dtype)), None


def load_policy(
    spec: str,
    *,
    model: LoadedModel | None = None,
    name: str | None = None,
    fmt: PromptFormat | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    stop_strings: Sequence[str] | None = None,
    dtype: VerifierDtype = "auto",
) -> Policy:
    """A policy from a model spec, `RUN_DIR[@STEP]` or an AlpacaEval outputs file; weights load on first use.

    `model` supplies an already loaded model for a model spec (it is used, never released). For a run
    directory the prompt format, template, system prompt and stop strings recorded in its config are the
    defaults; arguments given here override them.
    """
    if _is_outputs_file(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise CmeError(f"outputs file {path} does not exist")
        rows = read_model_outputs(path)
        outputs: dict[str, str] = {}
        for row in rows:
            outputs.setdefault(row["instruction"], str(row["output"] or ""))
        generators = {str(row.get("generator")) for row in rows if row.get("generator")}
        default_name = generators.pop() if len(generators) == 1 else path.stem
        return Policy(name or default_name, str(path.resolve()), fixed_outputs=outputs)
    run: RunCheckpoint | None = None
    loader: Callable[[], LoadedModel] | None = None
    if model is not None:
        source = model.spec
    else:
        source, loader, run = _model_source(spec, dtype)
    recorded = run.config.get("model", {}) if run is not None and isinstance(run.config.get("model"), dict) else {}
    default_name = f"{run.run_dir.name}@{run.step}" if run is not None else default_verifier_name(spec)
    stops = stop_strings if stop_strings is not None else recorded.get("stop_strings") or ()
    policy = Policy(
        name=name or default_name,
        source=source,
        fmt=fmt or recorded.get("prompt_format") or "auto",
        template=template or recorded.get("template") or DEFAULT_PLAIN_TEMPLATE,
        system_prompt=system_prompt if system_prompt is not None else recorded.get("system_prompt"),
        stop_strings=tuple(stops),
        model=model,
        loader=loader,
    )
    if policy.fmt not in ("auto", "chat", "plain"):
        raise CmeError(f"prompt format {policy.fmt!r} is not one of auto, chat, plain")
    if "{prompt}" not in policy.template:
        raise CmeError(f"prompt template {policy.template!r} must contain '{{prompt}}'")
    return policy


# ----------------------------------------------------------------------------------------------------------
# Prompt text the sampler takes verbatim


def as_verbatim_prompt(tokenizer: Any, text: str, chat: bool) -> str:
    """`text` adjusted so plain encoding gives exactly the ids of `text` encoded as a (chat) context.

    Chat templates spell out BOS themselves while plain encoding adds the tokenizer's default specials,
    so a leading BOS in a rendered chat text is dropped when plain encoding would add it again.
    """
    if not chat:
        return text
    want = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token
    candidates = [text] + ([text[len(bos) :]] if bos and text.startswith(bos) else [])
    for cand in candidates:
        if list(tokenizer(cand, add_special_tokens=True)["input_ids"]) == want:
            return cand
    raise CmeError(
        "this tokenizer adds special tokens that a chat-formatted prompt cannot reproduce; use a plain prompt "
        "format (--format plain) for it"
    )


def render_conversation(tokenizer: Any, messages: Sequence[Message]) -> str:
    """A conversation as the prompt a model continues: its chat template, else a plain role transcript."""
    if has_chat_template(tokenizer):
        msgs = [dict(m) for m in messages]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates refuse a system turn; fold it into the first user turn instead.
            if not msgs or msgs[0]["role"] != "system" or len(msgs) < 2:
                raise
            system, first = msgs[0], msgs[1]
            merged = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *msgs[2:]]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return as_verbatim_prompt(tokenizer, text, chat=True)
    labels = {"user": "User: ", "assistant": "Assistant: ", "system": ""}
    return "\n\n".join(labels.get(m["role"], f"{m['role']}: ") + m["content"] for m in messages) + "\n\nAssistant:"


def chat_replies(
    model: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy replies of a model to chat conversations, generated with the jitted sampler."""
    if not conversations:
        return []
    tok = model.tokenizer
    texts = [render_conversation(tok, conv) for conv in conversations]
    room = model.cfg.max_position - max_new_tokens
    for i, text in enumerate(texts):
        n = len(tok(text)["input_ids"])  # as the sampler encodes a plain prompt
        if n > room:
            raise CmeError(
                f"judge conversation {i} has {n} tokens, more than the {room} that fit beside {max_new_tokens} new "
                f"tokens in {model.spec}'s {model.cfg.max_position}-token context; lower --max-new-tokens or "
                "--judge-max-tokens, or use a judge with a longer context"
            )
    # A full batch every call: one compiled program per prompt-length bucket, whatever the call's size.
    padded = texts + [texts[-1]] * max(0, batch_size - len(texts))
    out = generate_responses(
        model,
        padded,
        SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
        fmt="plain",
        template=VERBATIM_TEMPLATE,
        batch_size=batch_size,
        progress=progress,
    )
    return [samples[0]["response"].strip() for samples in out[: len(texts)]]


VerdictMode = Literal["generate", "likelihood"]
VERDICT_MODES: tuple[VerdictMode, ...] = ("generate", "likelihood")
# The likelihood verdict: the judge's assistant turn is prefilled with this, and the verdict is whichever
# letter is the likelier next token.
VERDICT_PREFILL = "[["
VERDICT_LETTERS = ("A", "B")


def verdict_prompt(tokenizer: Any, messages: Sequence[Message], prefill: str = VERDICT_PREFILL) -> str:
    """The conversation as the judge continues it (`render_conversation`), its reply prefilled with `prefill`.

    A chat template's generation prompt opens the assistant turn, so the prefill follows it directly; the
    plain transcript of a model without a template ends in "Assistant:", so a space comes first.
    """
    text = render_conversation(tokenizer, messages)
    return text + (prefill if has_chat_template(tokenizer) else " " + prefill)


def _next_token_logprobs(weights: Any, cfg: Any, tokens_BxT: Any, mask_BxT: Any, ids_BxK: Any) -> Any:
    """log p(ids[b, k]) as the token after each left-padded row: float32 [B, K]; the head runs at one position."""
    import jax

    from cme_jax.models.transformer import default_positions, forward_hidden, logits_from_hidden

    h, _ = forward_hidden(weights, cfg, tokens_BxT, default_positions(mask_BxT), mask_BxT)
    logits_BxV = logits_from_hidden(weights, cfg, h[:, -1:])[:, 0]
    logp_BxV = logits_BxV - jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    return jax.numpy.take_along_axis(logp_BxV, ids_BxK, axis=1)


def _tail_logprob_sums(weights: Any, cfg: Any, tokens_BxT: Any, mask_BxT: Any, tail_BxM: Any) -> Any:
    """Summed log-probs of the tokens in the last M columns where `tail` is True: float32 [B]."""
    from cme_jax.models.logprobs import hidden_token_stats
    from cme_jax.models.transformer import default_positions, forward_hidden

    T, M = tokens_BxT.shape[1], tail_BxM.shape[1]
    h, _ = forward_hidden(weights, cfg, tokens_BxT, default_positions(mask_BxT), mask_BxT)
    logp = hidden_token_stats(weights, cfg, h[:, T - M - 1 : T - 1], tokens_BxT[:, T - M :])["logp"]
    return (logp * tail_BxM).sum(axis=1)


_VERDICT_JITS: dict[str, Any] = {}


def _verdict_jit(name: str) -> Any:
    """The jitted forms of the two functions above, built once (jax imports lazily in this module)."""
    if name not in _VERDICT_JITS:
        import jax

        fn = {"next": _next_token_logprobs, "tail": _tail_logprob_sums}[name]
        _VERDICT_JITS[name] = jax.jit(fn, static_argnames=("cfg",))
    return _VERDICT_JITS[name]


def _batched_rows(rows: Sequence[Sequence[int]], batch_size: int) -> list[tuple[list[int], list[list[int]]]]:
    """(row indices, rows padded with repeats to batch_size) per batch, rows sorted by length first."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = []
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        batch = [list(rows[i]) for i in idx]
        out.append((idx, batch + [batch[-1]] * (batch_size - len(batch))))
    return out


def continuation_logprobs(
    model: LoadedModel, texts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 8
) -> np.ndarray:
    """Summed log-prob of each continuation's tokens after each text, float64 [len(texts), len(continuations)].

    Each text + continuation is encoded whole (as the sampler encodes a plain prompt); the continuation's
    tokens are those after the longest prefix the encodings of all continuations share, so every
    continuation of a text is scored after the same context even when a letter merges with the text's
    last characters. One row per (text, continuation); left-padded batches of `batch_size` rows.
    """
    if batch_size < 1:
        raise CmeError(f"batch size must be >= 1, got {batch_size}")
    from cme_jax.tokens import bucket_length, left_pad, pad_id

    tok, K = model.tokenizer, len(continuations)
    rows: list[list[int]] = []
    tails: list[int] = []
    for i, text in enumerate(texts):
        seqs = [list(tok(text + c)["input_ids"]) for c in continuations]
        common = _common_prefix(seqs)
        _check_fits(model, i, max(len(q) for q in seqs))
        if common == 0 or any(len(q) == common for q in seqs):
            raise CmeError(f"judge conversation {i}: the continuations {list(continuations)} share no context")
        rows += seqs
        tails += [len(q) - common for q in seqs]
    out = np.zeros(len(rows), np.float64)
    fn = _verdict_jit("tail")
    for idx, batch in _batched_rows(rows, batch_size):
        T = bucket_length(max(len(r) for r in batch))
        tail_len = [tails[i] for i in idx] + [tails[idx[-1]]] * (batch_size - len(idx))
        M = min(bucket_length(max(tail_len), minimum=4), T - 1)
        toks, mask = left_pad(batch, T, pad_id(tok))
        tail = np.arange(M)[None, :] >= (M - np.asarray(tail_len))[:, None]
        sums = np.asarray(fn(model.weights, model.cfg, toks, mask, tail))
        out[idx] = sums[: len(idx)]
    return out.reshape(len(texts), K)


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(q) for q in seqs)
    for j in range(n):
        if len({q[j] for q in seqs}) > 1:
            return j
    return n


def _check_fits(model: LoadedModel, i: int, n: int) -> None:
    if n > model.cfg.max_position:
        raise CmeError(
            f"judge conversation {i} has {n} tokens, more than {model.spec}'s {model.cfg.max_position}-token "
            "context; use a judge with a longer context or shorter outputs"
        )


def verdict_logprobs(
    model: LoadedModel,
    conversations: Sequence[Sequence[Message]],
    *,
    letters: Sequence[str] = VERDICT_LETTERS,
    prefill: str = VERDICT_PREFILL,
    batch_size: int = 8,
) -> np.ndarray:
    """log p of each letter as the judge's next token after its reply is prefilled: float64 [N, len(letters)].

    Each conversation is rendered with `verdict_prompt`. When every letter is one token after a context all
    letters share (true for SmolLM2's and Gemma 3's tokenizers after "[["), one forward per conversation
    gives all letters, the vocabulary head running at the last position only; left-padded batches are padded
    with repeats to `batch_size` rows, so there is one compilation per length bucket. Conversations where a
    letter is several tokens fall back to `continuation_logprobs` (summed log-prob of each letter's tokens).
    """
    if batch_size < 1:
        raise CmeError(f"batch size must be >= 1, got {batch_size}")
    from cme_jax.tokens import bucket_length, left_pad, pad_id

    tok = model.tokenizer
    texts = [verdict_prompt(tok, conv, prefill) for conv in conversations]
    out = np.zeros((len(texts), len(letters)), np.float64)
    fast: list[int] = []
    contexts: list[list[int]] = []
    letter_ids: list[list[int]] = []
    slow: list[int] = []
    for i, text in enumerate(texts):
        seqs = [list(tok(text + letter)["input_ids"]) for letter in letters]
        common = _common_prefix(seqs)
        if common > 0 and all(len(q) == common + 1 for q in seqs):
            _check_fits(model, i, common + 1)
            fast.append(i)
            contexts.append(seqs[0][:common])
            letter_ids.append([q[common] for q in seqs])
        else:
            slow.append(i)
    fn = _verdict_jit("next")
    for idx, batch in _batched_rows(contexts, batch_size):
        toks, mask = left_pad(batch, bucket_length(max(len(r) for r in batch)), pad_id(tok))
        ids = np.asarray([letter_ids[j] for j in idx] + [letter_ids[idx[-1]]] * (batch_size - len(idx)), np.int32)
        logp = np.asarray(fn(model.weights, model.cfg, toks, mask, ids))
        out[[fast[j] for j in idx]] = logp[: len(idx)]
    if slow:
        out[slow] = continuation_logprobs(model, [texts[i] for i in slow], letters, batch_size=batch_size)
    return out


def likelihood_reply(logp: Sequence[float], letters: Sequence[str] = VERDICT_LETTERS, bias: float = 0.0) -> str:
    """The reply text of a likelihood verdict, e.g. `[[A]] (log p A=-0.3100, B=-1.4200)`; the first of equals wins.

    With two letters and a `bias`, the first letter wins only when log p(first) - log p(second) > bias (a
    judge's calibrated position preference, see `likelihood_bias`); the bias is part of the reply.
    """
    logp = np.asarray(logp, np.float64)
    if len(letters) == 2 and bias:
        best = 0 if logp[0] - logp[1] > bias else 1
    else:
        best = int(np.argmax(logp))
    numbers = ", ".join(f"{letter}={lp:.4f}" for letter, lp in zip(letters, logp))
    return f"[[{letters[best]}]] (log p {numbers}" + (f"; bias {bias:.4f})" if bias else ")")


def likelihood_bias(model: LoadedModel, pairs: Sequence[Any], *, batch_size: int = 8) -> float:
    """A likelihood judge's position preference, estimated without labels: the median of log p(A) - log p(B)
    over the verdict-only conversations of every pair in both orders.

    Each pair is shown both ways, so a judge without position preference has a median near 0; subtracting the
    median makes half of these verdicts A and half B. Small judges prefer the first answer so strongly that an
    uncalibrated likelihood judge answers A to everything.
    """
    conversations = [
        render_pairwise(p.prompt, a, b, verdict_only=True)
        for p in pairs
        for a, b in ((p.chosen, p.rejected), (p.rejected, p.chosen))
    ]
    logp = verdict_logprobs(model, conversations, batch_size=batch_size)
    return float(np.median(logp[:, 0] - logp[:, 1]))


def local_judge(
    model: LoadedModel | str,
    *,
    verdict: VerdictMode = "generate",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    dtype: VerifierDtype = "auto",
    progress: bool = False,
    bias: float = 0.0,
) -> FunctionJudge:
    """A judge run in JAX by any model cme_jax loads (a spec, `RUN_DIR[@STEP]`, or a loaded model).

    `verdict="generate"`: the judge writes its reply greedily (up to `max_new_tokens`) and the verdict is
    parsed from it. `verdict="likelihood"`: the judge is asked for the verdict only, its reply is prefilled
    with "[[" and the verdict is whichever of A and B is the likelier next token (`verdict_logprobs`); the
    reply text is `likelihood_reply`'s, so it always parses and judgments.jsonl keeps both log-probs; `bias`
    (from `likelihood_bias`) is subtracted from log p(A) - log p(B) to remove the judge's position preference.
    A spec is loaded on the first judging call, so a fully cached evaluation never loads it.
    """
    if verdict not in VERDICT_MODES:
        raise CmeError(f"judge verdict {verdict!r} is not one of {', '.join(VERDICT_MODES)}")
    if max_new_tokens < 1 or batch_size < 1:
        raise CmeError("the judge's max new tokens and batch size must be >= 1")
    if isinstance(model, str):
        source, loader, _ = _model_source(model, dtype)
        holder: list[LoadedModel] = []

        def get() -> LoadedModel:
            if not holder:
                holder.append(loader())
            return holder[0]
    else:
        source, loaded = model.spec, model

        def get() -> LoadedModel:
            return loaded

    if verdict == "likelihood":

        def likelihood(conversations: Sequence[list[Message]]) -> list[str]:
            logp = verdict_logprobs(get(), conversations, batch_size=batch_size)
            return [likelihood_reply(row, bias=bias) for row in logp]

        judge_id = f"cme_jax-local|{source}|likelihood|prefill={VERDICT_PREFILL}|letters={','.join(VERDICT_LETTERS)}"
        if bias:
            judge_id += f"|bias={bias:.6f}"
        return FunctionJudge(likelihood, judge_id=judge_id, batch_size=batch_size, verdict_only=True)

    def fn(conversations: Sequence[list[Message]]) -> list[str]:
        return chat_replies(get(), conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)

    judge_id = f"cme_jax-local|{source}|greedy|max_new_tokens={max_new_tokens}"
    return FunctionJudge(fn, judge_id=judge_id, batch_size=batch_size)


@dataclasses.dataclass
class _ProgressJudge:
    """Passes conversations through to a judge and prints a count of finished replies to stderr."""

    inner: Judge
    every: int = 16

    @property
    def judge_id(self) -> str:
        return self.inner.judge_id

    @property
    def verdict_only(self) -> bool:
        return bool(getattr(self.inner, "verdict_only", False))

    def judge(
        self, conversations: Sequence[list[Message]], on_result: Callable[[int, str], None] | None = None
    ) -> list[str]:
        done = [0]
        total = len(conversations)
        print(f"judging {total} conversations with {self.judge_id}", file=sys.stderr, flush=True)

        def report(i: int, text: str) -> None:
            if on_result is not None:
                on_result(i, text)
            done[0] += 1
            if done[0] % self.every == 0 or done[0] == total:
                print(f"  judged {done[0]}/{total}", file=sys.stderr, flush=True)

        return self.inner.judge(conversations, on_result=report)


# ----------------------------------------------------------------------------------------------------------
# Generation with a cache in OUT/<side>/


@dataclasses.dataclass
class SideOutputs:
    """One side's outputs in prompt order, with what generation knows about them."""

    outputs: list[str]
    stopped: list[bool] | None  # None for fixed outputs
    num_tokens: list[int] | None
    settings: dict[str, Any]
    reused: bool


def generation_settings(
    policy: Policy, instructions: Sequence[str], sampling: SamplingConfig, seed: int, truncate_left: bool = False
) -> dict[str, Any]:
    """Everything that decides a side's outputs; a cached side is reused only when these match."""
    if policy.fixed_outputs is not None:
        outputs = [policy.fixed_outputs.get(i, "") for i in instructions]
        return {
            "generator": policy.name,
            "outputs_file": policy.source,
            "instructions": _digest(instructions),
            "outputs": _digest(outputs),
        }
    return {
        "generator": policy.name,
        "source": policy.source,
        "format": policy.fmt,
        "template": policy.template,
        "system_prompt": policy.system_prompt,
        "stop_strings": list(policy.stop_strings),
        "sampling": dataclasses.asdict(sampling),
        "seed": seed,
        "truncate_left": truncate_left,
        "instructions": _digest(instructions),
    }


def _cached_side(side_dir: Path, settings: dict, prompts: Sequence[EvalPrompt]) -> SideOutputs | None:
    try:
        saved = json.loads((side_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
        rows = read_model_outputs(side_dir / OUTPUTS_FILE)
    except (OSError, ValueError, CmeError):
        return None
    if not isinstance(saved, dict) or saved.get("settings") != settings:
        return None
    if [r["instruction"] for r in rows] != [p.instruction for p in prompts]:
        return None
    meta = saved.get("rows")
    stopped = num_tokens = None
    if isinstance(meta, list) and len(meta) == len(rows):
        stopped = [bool(m.get("stopped", True)) for m in meta]
        num_tokens = [int(m.get("num_tokens", 0)) for m in meta]
    return SideOutputs([str(r["output"] or "") for r in rows], stopped, num_tokens, settings, reused=True)


def side_outputs(
    policy: Policy,
    prompts: Sequence[EvalPrompt],
    side_dir: str | Path,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    seed: int = 0,
    batch_size: int = 16,
    truncate_left: bool = False,
    regenerate: bool = False,
    progress: bool = False,
) -> SideOutputs:
    """A side's outputs: reused from side_dir when its settings match, else generated and written there."""
    side_dir = Path(side_dir)
    instructions = [p.instruction for p in prompts]
    settings = generation_settings(policy, instructions, sampling, seed, truncate_left)
    if not regenerate:
        cached = _cached_side(side_dir, settings, prompts)
        if cached is not None:
            _say(progress, f"{policy.name}: reusing {len(cached.outputs)} outputs from {side_dir / OUTPUTS_FILE}")
            return cached
        if (side_dir / OUTPUTS_FILE).exists():
            _say(progress, f"{policy.name}: prompts or generation settings changed; generating again")
    if policy.fixed_outputs is not None:
        missing = [p.instruction for p in prompts if p.instruction not in policy.fixed_outputs]
        if missing:
            raise CmeError(
                f"{policy.source} has no output for {len(missing)} of the {len(prompts)} prompts (first: "
                f"{missing[0][:60]!r}); give an outputs file made for this prompt set"
            )
        outputs = [policy.fixed_outputs[i] for i in instructions]
        stopped = num_tokens = None
    else:
        model = policy.get_model()
        texts, fmt, template = instructions, policy.fmt, policy.template
        if policy.system_prompt is not None:
            chat = fmt == "chat" or (fmt == "auto" and has_chat_template(model.tokenizer))
            tok = model.tokenizer
            texts = [
                as_verbatim_prompt(tok, format_prompt(tok, p, fmt, template, policy.system_prompt), chat)
                for p in instructions
            ]
            fmt, template = "plain", VERBATIM_TEMPLATE
        _say(progress, f"{policy.name}: generating {len(texts)} outputs ({sampling.max_new_tokens} new tokens at most)")
        results = generate_responses(
            model,
            texts,
            sampling,
            seed=seed,
            fmt=fmt,
            template=template,
            batch_size=batch_size,
            stop_strings=policy.stop_strings,
            truncate_left=truncate_left,
            progress=progress,
        )
        outputs = [samples[0]["response"].strip() for samples in results]
        stopped = [bool(samples[0]["stopped"]) for samples in results]
        num_tokens = [len(samples[0]["tokens"]) for samples in results]
    write_model_outputs(side_dir / OUTPUTS_FILE, instructions, outputs, policy.name, [p.dataset for p in prompts])
    rows = None if stopped is None else [{"stopped": s, "num_tokens": n} for s, n in zip(stopped, num_tokens)]
    (side_dir / SETTINGS_FILE).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return SideOutputs(outputs, stopped, num_tokens, settings, reused=False)


# ----------------------------------------------------------------------------------------------------------
# Automatic metrics


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def side_text_metrics(side: SideOutputs) -> dict[str, Any]:
    """Distinct-2 (whitespace words, comparable across tokenizers), mean lengths, stop and repetition rates."""
    outs = side.outputs
    return {
        "distinct_2": distinct_n(outs, 2),
        "mean_length_characters": _mean([len(o) for o in outs]),
        "mean_length_words": _mean([len(o.split()) for o in outs]),
        "mean_length_tokens": _mean(side.num_tokens) if side.num_tokens is not None else None,
        "stopped_rate": _mean([float(s) for s in side.stopped]) if side.stopped is not None else None,
        "truncated_rate": _mean([1.0 - s for s in side.stopped]) if side.stopped is not None else None,
        f"repetition_{REPETITION_N}": _mean([repetition_rate(o, REPETITION_N) for o in outs]),
        "empty": sum(not o for o in outs),
    }


# n of the word n-gram repetition rate reported per output (the trainer's guard counts policy-token 4-grams).
REPETITION_N = 4


def output_metrics(side: SideOutputs) -> dict[str, np.ndarray]:
    """Per-output statistics as float64 [n], NaN where unknown (the source of every paired interval).

    Lengths; `truncated` (1 when generation hit the token limit); the word 4-gram repetition rate; distinct-2
    inside the output (whitespace words, comparable across tokenizers; NaN below two words).
    """
    outs = side.outputs
    unknown = np.full(len(outs), np.nan)
    per = lambda fn: np.array([fn(o) for o in outs], np.float64)
    return {
        "length_tokens": unknown if side.num_tokens is None else np.asarray(side.num_tokens, np.float64),
        "length_words": per(lambda o: len(o.split())),
        "truncated": unknown if side.stopped is None else 1.0 - np.asarray(side.stopped, np.float64),
        f"repetition_{REPETITION_N}": per(lambda o: repetition_rate(o, REPETITION_N)),
        "distinct_2": per(lambda o: distinct_n([o], 2) if len(o.split()) >= 2 else np.nan),
    }


def interval(x: np.ndarray, *, seed: int = 0, n_boot: int = 2000) -> dict[str, float | int | None]:
    """Mean of the finite values with a percentile-bootstrap 95% interval over them."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    ci = bootstrap_ci(x, seed=seed, n_boot=n_boot)
    return {
        "mean": float(x.mean()) if x.size else None,
        "ci95_low": ci[0] if ci else None,
        "ci95_high": ci[1] if ci else None,
        "n": int(x.size),
    }


def paired_interval(model_x: np.ndarray, base_x: np.ndarray, *, seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Both sides' means and their per-prompt difference (model - baseline), each with a bootstrap 95% interval.

    Only prompts where both values are known count; one seed means every interval resamples the same prompts.
    """
    model_x, base_x = np.asarray(model_x, np.float64), np.asarray(base_x, np.float64)
    both = np.isfinite(model_x) & np.isfinite(base_x)
    m, b = model_x[both], base_x[both]
    kw = dict(seed=seed, n_boot=n_boot)
    return {"model": interval(m, **kw), "baseline": interval(b, **kw), "difference": interval(m - b, **kw)}


def token_metrics(
    policy: Policy,
    model: LoadedModel,
    reference: LoadedModel | None,
    instructions: Sequence[str],
    outputs: Sequence[str],
    *,
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """Per output: the model's mean token entropy over it and, with a reference, the mean exact KL(model || ref).

    The output is re-read as text after the prompt in `policy`'s format (its chat template or plain template),
    with the model's tokenizer; the KL at each position is over the whole vocabulary, so its mean over sampled
    outputs estimates the per-token KL of the policy from its reference. Empty outputs give NaN.
    """
    from cme_jax.models.logprobs import token_kl_jit
    from cme_jax.scoring import pack_rows, same_tokenizer
    from cme_jax.tokens import encode_prompts, pad_id

    tok = model.tokenizer
    same_arch = reference is None or dataclasses.replace(reference.cfg, remat=model.cfg.remat) == model.cfg
    if reference is not None and not (same_arch and same_tokenizer(tok, reference.tokenizer)):
        raise CmeError(
            f"KL reference {reference.spec} must share {model.spec}'s architecture and tokenizer (its base model)"
        )
    contexts = encode_prompts(tok, instructions, policy.fmt, policy.template, policy.system_prompt)
    responses = [list(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs]
    n = len(outputs)
    out = {"entropy": np.full(n, np.nan)}
    if reference is not None:
        out["kl"] = np.full(n, np.nan)
    keep = [i for i in range(n) if responses[i]]
    size = max(1, min(batch_size, len(keep) or 1))
    ref_weights = None if reference is None else reference.weights
    for lo in range(0, len(keep), size):
        idx = keep[lo : lo + size]
        tokens, mask, start = pack_rows([contexts[i] for i in idx], [responses[i] for i in idx], pad_id(tok), rows=size)
        stats = token_kl_jit(model.weights, ref_weights, model.cfg, tokens, mask, start=start)
        count = mask[:, start:].sum(axis=1)
        for key, v in stats.items():
            means = np.asarray(v, np.float64).sum(axis=1) / np.maximum(count, 1)
            out[key][idx] = means[: len(idx)]
    return out


def side_token_metrics(
    model: Policy,
    baseline: Policy,
    reference: LoadedModel | str,
    prompts: Sequence[EvalPrompt],
    sides: Mapping[Side, SideOutputs],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[Side, dict[str, np.ndarray]]:
    """`token_metrics` of each side: the model's entropy and KL to `reference` on its outputs (when it is a
    model), and the reference's entropy on the baseline's outputs (its own entropy when it is the baseline)."""
    if isinstance(reference, str):
        reference = _model_source(reference, "auto")[1]()
    instructions = [p.instruction for p in prompts]
    out: dict[Side, dict[str, np.ndarray]] = {}
    if model.fixed_outputs is None:
        _say(progress, f"{model.name}: entropy and KL to {reference.spec} over its {len(prompts)} outputs")
        out["model"] = token_metrics(
            model, model.get_model(), reference, instructions, sides["model"].outputs, batch_size=batch_size
        )
        model.release()
    _say(progress, f"{baseline.name}: entropy of {reference.spec} over its outputs")
    out["baseline"] = token_metrics(
        baseline, reference, None, instructions, sides["baseline"].outputs, batch_size=batch_size
    )
    return out


def automatic_metrics(
    prompts: Sequence[EvalPrompt],
    sides: Mapping[Side, SideOutputs],
    verifiers: Sequence[Verifier | VerifierConfig] = (),
    *,
    batch_size: int = 16,
    progress: bool = False,
    tokens: Mapping[Side, Mapping[str, np.ndarray]] | None = None,
    score_cache: JudgmentCache | None = None,
    seed: int = 0,
    n_boot: int = 2000,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CME of both sides under each verifier in both forms, text statistics, token metrics, paired intervals.

    Returns the `automatic` section of results.json and per-prompt rows. For each verifier, `cme_<name>` is
    the mean over non-empty outputs of its configured form (what training with that verifier would reward),
    `cme_<name>_plain` and `cme_<name>_contrastive` both forms (as `cme_jax.audit` scores them); `cme` is the
    verifier-weighted sum of the configured forms; `cme_win_rate` is the share of prompts (both outputs
    non-empty) where the model's `cme` is higher, ties counting half. `tokens` holds per-output token
    metrics of each side (`token_metrics`: entropy, KL to a reference). `intervals` holds, per metric, both
    sides' means and the model-minus-baseline difference with bootstrap 95% intervals over prompts (model-only
    metrics such as the KL: the model's mean). Configs are loaded one at a time and released after scoring;
    `score_cache` keeps scored rows so an unchanged side is not scored twice.
    """
    instructions = [p.instruction for p in prompts]
    n = len(prompts)
    summary: dict[str, Any] = {"verifiers": [], **{s: side_text_metrics(sides[s]) for s in SIDES}}
    per: dict[Side, dict[str, np.ndarray]] = {s: output_metrics(sides[s]) for s in SIDES}
    for side, values in (tokens or {}).items():
        per[side].update({k: np.asarray(v, np.float64) for k, v in values.items()})
        for k, v in values.items():
            summary[side][k] = interval(v)["mean"]
    rows: list[dict[str, Any]] = [{"index": i, "instruction": ins} for i, ins in enumerate(instructions)]
    if verifiers:
        texts = sides["model"].outputs + sides["baseline"].outputs
        stopped = [
            s for side in SIDES for s in (sides[side].stopped if sides[side].stopped is not None else [True] * n)
        ]
        scored: dict[str, Any] = {}
        configs = []
        for v in verifiers:
            verifier = load_verifier(v) if isinstance(v, VerifierConfig) else v
            vc = verifier.config
            _say(progress, f"scoring {2 * n} outputs with verifier {vc.name} ({vc.model}), plain and contrastive")
            forms = score_forms(
                verifier,
                instructions * 2,
                texts,
                stopped=stopped,
                batch_size=batch_size,
                allow_empty=True,
                cache=score_cache,
            )
            del verifier
            scored[vc.name] = forms
            configs.append(vc)
            summary["verifiers"].append(
                {
                    "name": vc.name,
                    "model": vc.model,
                    "weight": vc.weight,
                    "context": vc.context,
                    "template": vc.template,
                    "contrastive": vc.contrastive,
                }
            )
        # The reward training with these verifiers would give each output: the trainer's own `combine`.
        inputs = RewardInputs(empty=np.array([not t for t in texts]), verifiers=scored)
        parts = combine_host(cme_config(configs), inputs)
        total, empty = parts.rewards.astype(np.float64), parts.empty
        for vc in configs:
            forms = scored[vc.name]
            keys = {
                f"cme_{vc.name}": form_scores(forms, "contrastive" if vc.contrastive else "plain"),
                **{f"cme_{vc.name}_{f}": form_scores(forms, f) for f in FORMS},
            }
            for k, side in enumerate(SIDES):
                part = slice(k * n, (k + 1) * n)
                for key, x in keys.items():
                    vals = np.where(np.asarray(forms.empty)[part], np.nan, x[part])
                    per[side][key] = vals
                    summary[side][key] = interval(vals)["mean"]
        for k, side in enumerate(SIDES):
            part = slice(k * n, (k + 1) * n)
            per[side]["cme"] = np.where(empty[part], np.nan, total[part])
            summary[side]["cme"] = interval(per[side]["cme"])["mean"]
        both = ~empty[:n] & ~empty[n:]
        diff = total[:n][both] - total[n:][both]
        summary["cme_win_rate"] = _mean(((diff > 0) + 0.5 * (diff == 0)).tolist())
        summary["cme_compared"] = int(both.sum())
    kw = dict(seed=seed, n_boot=n_boot)
    summary["intervals"] = {
        key: paired_interval(x, per["baseline"][key], **kw)
        if key in per["baseline"]
        else {"model": interval(x, **kw), "n": int(np.isfinite(x).sum())}
        for key, x in per["model"].items()
    }
    for side in SIDES:
        for key, x in per[side].items():
            if key.startswith("cme") or key in ("entropy", "kl"):
                for i in range(n):
                    rows[i][f"{side}_{key}"] = None if not np.isfinite(x[i]) else float(x[i])
    return summary, rows


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _with_ci(d: Mapping[str, Any] | None, digits: int) -> str:
    """`mean [low, high]` of an interval dict."""
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{_fmt(d['mean'], digits)} [{_fmt(d['ci95_low'], digits)}, {_fmt(d['ci95_high'], digits)}]"


def automatic_report(auto: dict[str, Any], model_name: str, base_name: str) -> str:
    """The markdown section for the automatic metrics: both sides and their difference, with 95% intervals."""
    m, b, iv = auto["model"], auto["baseline"], auto.get("intervals", {})
    lines = [
        "## Automatic metrics",
        "",
        f"| metric | {model_name} | {base_name} | difference, model - baseline [95% CI] |",
        "|---|---|---|---|",
    ]
    # (label, key in each side's summary, key in intervals or None, digits; None digits = a percentage)
    table: list[tuple[str, str, str | None, int | None]] = []
    for v in auto["verifiers"]:
        form = "contrastive" if v.get("contrastive") else "plain"
        other = "plain" if form == "contrastive" else "contrastive"
        key = f"cme_{v['name']}"
        table.append((f"CME under `{v['model']}` (`{v['name']}`, {form}, weight {v['weight']:g})", key, key, 3))
        table.append((f"CME under `{v['model']}`, {other} form", f"{key}_{other}", f"{key}_{other}", 3))
    if len(auto["verifiers"]) > 1:
        table.append(("CME, weighted sum", "cme", "cme", 3))
    table += [
        ("distinct-2 (word bigrams over all outputs; interval: within each output)", "distinct_2", "distinct_2", 3),
        ("mean length (characters)", "mean_length_characters", None, 1),
        ("mean length (words)", "mean_length_words", "length_words", 1),
        ("mean length (own tokens)", "mean_length_tokens", "length_tokens", 1),
        ("cut at the token limit", "truncated_rate", "truncated", None),
        (f"word {REPETITION_N}-gram repetition", f"repetition_{REPETITION_N}", f"repetition_{REPETITION_N}", 3),
        ("mean token entropy (nats)", "entropy", "entropy", 3),
        ("KL to the reference (nats/token)", "kl", "kl", 4),
        ("empty outputs", "empty", None, 0),
    ]
    for label, key, ikey, digits in table:
        if m.get(key) is None and b.get(key) is None:
            continue
        cells = [_pct(side.get(key)) if digits is None else _fmt(side.get(key), digits) for side in (m, b)]
        d = iv.get(ikey) if ikey else None
        diff = _with_ci(d["difference"], 3 if digits is None else max(digits, 3)) if d and "difference" in d else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {diff} |")
    lines.append("")
    if auto["verifiers"]:
        lines += [
            f"{model_name}'s CME is higher than {base_name}'s on {_pct(auto.get('cme_win_rate'))} of "
            f"{auto.get('cme_compared', 0)} prompts (ties count half). CME is the mean per-token log-likelihood "
            "of an output under a frozen verifier (higher is more likely); bland, repetitive or cut-off text can "
            "score high, so read it beside distinct-2, repetition, length and the judge.",
            "",
        ]
    lines += [
        "Intervals are percentile-bootstrap 95% intervals over prompts; per-prompt values are in automatic.jsonl.",
        "",
    ]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate(
    model: Policy,
    baseline: Policy,
    prompts: Sequence[EvalPrompt | str],
    judge: Judge | None,
    out_dir: str | Path,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    verifiers: Sequence[Verifier | VerifierConfig] = (),
    seed: int = 0,
    batch_size: int = 16,
    retries_unparsed: int = 2,
    audit_pairs: int = 0,
    audit: Mapping[str, Any] | None = None,
    early_stop: int = EARLY_STOP_PAIRS,
    n_boot: int = 2000,
    regenerate: bool = False,
    truncate_left: bool = False,
    prompt_source: str | None = None,
    progress: bool = True,
    kl_reference: LoadedModel | str | None = None,
    score_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Generate (or reuse) both sides' outputs, score them, judge every pair in both orders, write OUT.

    Models are loaded when first needed and each side's own model is released after it generated,
    so at most one policy, then one verifier, then the judge are held at a time. Returns the dict
    written to results.json. With `kl_reference` (a model or spec, usually the base of the trained model),
    the model's per-token entropy and exact KL to it over its outputs, and the reference's entropy over
    the baseline's outputs, join the automatic metrics. Scored verifier rows are kept in `score_cache`
    (default OUT/score_cache.jsonl), so a rerun or another evaluation with the same baseline outputs
    does not score them again.

    Judging: `judge=None` runs generation and the automatic metrics only (results.json without a win
    rate). `audit_pairs=N` first scores the judge itself on the first N shipped preference pairs
    (`judge_audit`, same cache), or `audit` supplies a `judge_audit` result computed once elsewhere; it
    goes into results.json ("judge_audit") and beside the win rate in report.md. With `early_stop=K`, a
    judge that leaves more than half of the first K pairs unparsed stops the run with one line (audit and
    evaluation alike), keeping its finished judgments in the cache.
    """
    if sampling.num_samples != 1:
        raise CmeError("evaluation compares one output per prompt; use num_samples=1")
    if batch_size < 1 or retries_unparsed < 0:
        raise CmeError("batch size must be >= 1 and unparsed retries >= 0")
    audit_set = _audit_pairs(audit_pairs) if audit_pairs else None
    if judge is None and (audit_set is not None or audit is not None):
        raise CmeError("a judge audit needs a judge; drop --judge-audit or give a judge instead of --no-judge")
    if audit_set is not None and audit is not None:
        raise CmeError("give either audit_pairs (run the judge audit) or audit (a finished one), not both")
    prompts = [p if isinstance(p, EvalPrompt) else EvalPrompt(p) for p in prompts]
    if not prompts:
        raise CmeError("no prompts given; pass at least one instruction")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CmeError(f"--out {out} is a file; give a directory")
    if model.name == baseline.name:
        model = dataclasses.replace(model, name=f"{model.name}-model")
        baseline = dataclasses.replace(baseline, name=f"{baseline.name}-baseline")
    sides: dict[Side, SideOutputs] = {}
    for side, policy in (("model", model), ("baseline", baseline)):
        sides[side] = side_outputs(
            policy,
            prompts,
            out / side,
            sampling=sampling,
            seed=seed,
            batch_size=batch_size,
            truncate_left=truncate_left,
            regenerate=regenerate,
            progress=progress,
        )
        policy.release()

    tokens = None
    if kl_reference is not None:
        tokens = side_token_metrics(
            model, baseline, kl_reference, prompts, sides, batch_size=batch_size, progress=progress
        )
    auto, auto_rows = automatic_metrics(
        prompts,
        sides,
        verifiers,
        batch_size=batch_size,
        progress=progress,
        tokens=tokens,
        score_cache=JudgmentCache(out / "score_cache.jsonl" if score_cache is None else score_cache),
        seed=seed,
        n_boot=n_boot,
    )

    summary: dict[str, Any] | None = None
    if judge is None:
        paths = _write_without_judge(out, model.name, baseline.name)
    else:
        items = [
            PairItem(p.instruction, m, b, p.dataset)
            for p, m, b in zip(prompts, sides["model"].outputs, sides["baseline"].outputs)
        ]
        cache_path = out / "judge_cache.jsonl"
        cache = JudgmentCache(cache_path)
        active: Judge = _ProgressJudge(judge) if progress else judge
        try:
            if audit_set is not None:
                _say(progress, f"judge audit: {len(audit_set)} shipped preference pairs in both orders")
                audit = judge_audit(
                    active,
                    audit_set,
                    cache,
                    retries_unparsed=retries_unparsed,
                    early_stop=early_stop,
                    seed=seed,
                    n_boot=n_boot,
                )
                _say(progress, audit_sentence(audit).replace("**", ""))
            _say(progress, f"judging {len(items)} pairs in both orders ({len(cache)} judgments cached in {cache_path})")
            records = run_pairwise(items, active, cache, retries_unparsed=retries_unparsed, early_stop=early_stop)
        except UnusableJudgeError as e:
            raise CmeError(f"{e} ({len(cache)} finished judgments are cached in {cache_path})") from None
        except CmeError as e:
            raise CmeError(
                f"{e} ({len(cache)} finished judgments are cached in {cache_path}; rerun the same command to resume)"
            ) from None
        summary = summarize_records(records, seed=seed, n_boot=n_boot)
        paths = write_results(out, records, summary, model.name, baseline.name, judge_id=judge.judge_id, audit=audit)

    results = json.loads(paths["results.json"].read_text(encoding="utf-8"))
    results["automatic"] = auto
    results["prompts"] = {"source": prompt_source, "count": len(prompts)}
    results["generation"] = {side: sides[side].settings for side in SIDES}
    results["outputs"] = {side: str(Path(side) / OUTPUTS_FILE) for side in SIDES}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = paths["report.md"].read_text(encoding="utf-8")
    paths["report.md"].write_text(report + "\n" + automatic_report(auto, model.name, baseline.name), encoding="utf-8")
    if verifiers:
        with open(out / "automatic.jsonl", "w", encoding="utf-8") as f:
            for row in auto_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        (out / "automatic.jsonl").unlink(missing_ok=True)  # an earlier run's scores would no longer match
    if summary is None:
        _say(
            progress,
            f"{model.name} vs {baseline.name}: no judge, automatic metrics only; report in {paths['report.md']}",
        )
        return results
    rate = summary["win_rate_tie_adjusted"]
    _say(
        progress,
        f"{model.name} vs {baseline.name}: {summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses, "
        f"{summary['unparsed']} unparsed; tie-adjusted win rate {_pct(rate)}; report in {paths['report.md']}",
    )
    return results


def _audit_pairs(n: int) -> list[Any]:
    """The first n shipped preference pairs for the judge audit; CmeError when n is out of range."""
    from cme_jax.audit import shipped_pairs

    pairs = shipped_pairs()
    if not 0 <= n <= len(pairs):
        raise CmeError(f"--judge-audit must be between 0 and {len(pairs)} (the shipped preference pairs), got {n}")
    return pairs[:n]


def _write_without_judge(out: Path, model_name: str, base_name: str) -> dict[str, Path]:
    """results.json and report.md of an evaluation without a judge; an earlier run's judged files are removed."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("judgments.jsonl", "report.png"):
        (out / stale).unlink(missing_ok=True)
    paths = {"results.json": out / "results.json", "report.md": out / "report.md"}
    results = {"model": model_name, "baseline": base_name, "judge": None}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["report.md"].write_text(
        f"# {model_name} vs {base_name}\n\nNo judge was run (`--no-judge`): this evaluation has no win rate, only the "
        "automatic metrics below.\n",
        encoding="utf-8",
    )
    return paths


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.evaluate", description=__doc__.split("\n")[0])
    g = p.add_argument_group("policies and prompts")
    g.add_argument("--model", required=True, help="model spec, RUN_DIR[@STEP] or an AlpacaEval outputs .json")
    g.add_argument("--baseline", required=True, help="model spec, RUN_DIR[@STEP] or an AlpacaEval outputs .json")
    g.add_argument("--model-name", help="generator name of --model in the outputs and the report")
    g.add_argument("--baseline-name", help="generator name of --baseline")
    g.add_argument("--prompts", required=True, help="alpaca_eval, builtin:NAME, a .json/.jsonl/.parquet file, Hub id")
    g.add_argument("--prompt-field", help="prompt field (default: prompt, instruction or messages)")
    g.add_argument("--split", default="train", help="split of a Hub prompt dataset")
    g.add_argument("--limit", type=int, help="evaluate the first N prompts only")
    g.add_argument("--heldout-fraction", type=float, help="keep only prompts a run with this heldout_fraction held out")
    g.add_argument("--out", required=True, type=Path, help="output directory (outputs, judgments, results, report)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_SAMPLING.max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--format", choices=["auto", "chat", "plain"], help="prompt format (default: the run's, else auto)")
    g.add_argument("--template", help="plain prompt template with {prompt} (default: the run's, else '{prompt}\\n')")
    g.add_argument("--stop", action="append", help="extra single-token stop string; repeat for several")
    g.add_argument("--truncate-left", action="store_true", help="cut over-long prompts from the left")
    g.add_argument("--regenerate", action="store_true", help="generate again even when OUT holds matching outputs")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation and scoring batch")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="policies and judge")
    g.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    g = p.add_argument_group("judge (exactly one of --judge-model, --judge-url or --no-judge)")
    g.add_argument("--judge-model", help="model spec or RUN_DIR[@STEP] run locally as the judge")
    g.add_argument("--judge-url", help="base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1")
    g.add_argument("--no-judge", action="store_true", help="no judge: generation and automatic metrics only")
    g.add_argument(
        "--judge-verdict",
        help="local judge: generate (write a reply, parse its verdict; default) or likelihood (the likelier of "
        "A and B after '[[', no generation)",
    )
    g.add_argument(
        "--judge-audit",
        type=int,
        default=0,
        metavar="N",
        help="first score the judge on N of the 48 shipped preference pairs (0 = off, default)",
    )
    g.add_argument("--judge-name", help="model name sent to --judge-url")
    g.add_argument("--judge-key-env", help="environment variable holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--judge-no-key", action="store_true", help="send no API key (local servers)")
    g.add_argument("--judge-max-tokens", type=int, help="judge reply length (default: 1024 for URLs, 256 local)")
    g.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight to --judge-url")
    g.add_argument("--judge-retries", type=int, default=5, help="retries per failed request, with backoff")
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--judge-batch-size", type=int, default=8, help="conversations per local judge batch")
    g.add_argument("--retries-unparsed", type=int, default=2, help="follow-ups asking for a missing verdict")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the interval")
    g = p.add_argument_group("automatic metrics")
    g.add_argument(
        "--kl-reference",
        help="model spec (usually the base of --model): the model's entropy and exact KL to it over its outputs",
    )
    g.add_argument(
        "--score-cache", type=Path, help="scored-row cache shared by evaluations (default OUT/score_cache.jsonl)"
    )
    add_verifier_args(p)
    return p


def build_judge(args: argparse.Namespace) -> Judge | None:
    """The judge the arguments name (None for --no-judge); CmeError for none, two, or bad settings, before
    anything loads."""
    if args.no_judge:
        if args.judge_model is not None or args.judge_url is not None:
            raise CmeError("--no-judge and --judge-model/--judge-url exclude each other; give one")
        for flag in ("judge_name", "judge_key_env", "judge_max_tokens", "judge_verdict"):
            if getattr(args, flag) is not None:
                raise CmeError(f"--{flag.replace('_', '-')} needs a judge; drop it or --no-judge")
        if args.judge_no_key or args.judge_audit:
            flag = "--judge-no-key" if args.judge_no_key else "--judge-audit"
            raise CmeError(f"{flag} needs a judge; drop it or --no-judge")
        return None
    if (args.judge_model is None) == (args.judge_url is None):
        raise CmeError(
            "give exactly one judge: --judge-model SPEC (run locally) or --judge-url URL with --judge-name MODEL"
        )
    if args.judge_max_tokens is not None and args.judge_max_tokens < 1:
        raise CmeError(f"--judge-max-tokens must be >= 1, got {args.judge_max_tokens}")
    verdict = args.judge_verdict
    if verdict is not None and verdict not in VERDICT_MODES:
        raise CmeError(f"--judge-verdict must be one of {', '.join(VERDICT_MODES)}, got {verdict!r}")
    _audit_pairs(args.judge_audit)  # the range check, before anything loads
    if args.judge_model is not None:
        for flag in ("judge_name", "judge_key_env"):
            if getattr(args, flag) is not None:
                raise CmeError(f"--{flag.replace('_', '-')} goes with --judge-url, not with --judge-model")
        if verdict == "likelihood" and args.judge_max_tokens is not None:
            raise CmeError("--judge-max-tokens goes with --judge-verdict generate; a likelihood verdict writes nothing")
        return local_judge(
            args.judge_model,
            verdict=verdict or "generate",
            max_new_tokens=args.judge_max_tokens or 256,
            batch_size=args.judge_batch_size,
            dtype=args.dtype,
        )
    if verdict == "likelihood":
        raise CmeError(
            "--judge-verdict likelihood needs a local judge (--judge-model): an API returns text, not the log-probs"
        )
    if not args.judge_name:
        raise CmeError("--judge-url needs --judge-name MODEL, the model name the endpoint serves")
    if not args.judge_url.startswith(("http://", "https://")):
        raise CmeError(f"--judge-url {args.judge_url!r} must start with http:// or https://")
    if args.judge_no_key and args.judge_key_env is not None:
        raise CmeError("--judge-no-key and --judge-key-env contradict each other; give one")
    key_env = None if args.judge_no_key else (args.judge_key_env or "OPENAI_API_KEY")
    if key_env is not None and not os.environ.get(key_env, "").strip():
        raise CmeError(
            f"environment variable {key_env} is not set; export the judge's API key there, name another variable "
            "with --judge-key-env, or pass --judge-no-key for a server that needs no key"
        )
    return OpenAIJudge(
        base_url=args.judge_url,
        model=args.judge_name,
        api_key_env=key_env,
        max_concurrency=args.judge_concurrency,
        max_retries=args.judge_retries,
        timeout=args.judge_timeout,
        max_tokens=args.judge_max_tokens or 1024,
    )


def _heldout_hint(spec: str, prompts: str, heldout_fraction: float | None) -> None:
    """Warn when a run is evaluated on the prompt set it trained on without its held-out split."""
    if heldout_fraction is not None or _is_outputs_file(spec):
        return
    run_spec = parse_run_spec(spec)
    if run_spec is None:
        return
    data = inspect_run(*run_spec).config.get("data") or {}
    fraction = data.get("heldout_fraction") or 0.0
    if data.get("source") == prompts and fraction > 0:
        print(
            f"note: {spec} trained on {prompts} with heldout_fraction={fraction}; pass --heldout-fraction "
            f"{fraction} to evaluate on the prompts it never saw",
            file=sys.stderr,
        )


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "judge_batch_size", "judge_concurrency", "bootstrap"):
        if getattr(args, flag) < 1:
            raise CmeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.retries_unparsed < 0 or args.judge_retries < 0:
        raise CmeError("--retries-unparsed and --judge-retries must be >= 0")
    if args.out.exists() and not args.out.is_dir():
        raise CmeError(f"--out {args.out} is a file; give a directory")
    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
        )
    except ValueError as e:
        raise CmeError(str(e)) from None
    # CME of both sides under the verifiers, combined as training would (no groups here: one output a prompt).
    verifiers = list(verifier_reward(args, groups=False).verifiers) if args.verifier or args.verifier_config else []
    judge = build_judge(args)
    prompts = load_eval_prompts(
        args.prompts,
        limit=args.limit,
        heldout_fraction=args.heldout_fraction,
        field=args.prompt_field,
        split=args.split,
    )
    overrides = dict(fmt=args.format, template=args.template, stop_strings=args.stop, dtype=args.dtype)
    model = load_policy(args.model, name=args.model_name, **overrides)
    baseline = load_policy(args.baseline, name=args.baseline_name, **overrides)
    _heldout_hint(args.model, args.prompts, args.heldout_fraction)
    print(
        f"evaluating {model.name} against {baseline.name} on {len(prompts)} prompts from {args.prompts}",
        file=sys.stderr,
    )
    evaluate(
        model,
        baseline,
        prompts,
        judge,
        args.out,
        sampling=sampling,
        verifiers=verifiers,
        seed=args.seed,
        batch_size=args.batch_size,
        retries_unparsed=args.retries_unparsed,
        audit_pairs=args.judge_audit,
        n_boot=args.bootstrap,
        regenerate=args.regenerate,
        truncate_left=args.truncate_left,
        prompt_source=args.prompts,
        kl_reference=args.kl_reference,
        score_cache=args.score_cache,
    )


if __name__ == "__main__":
    main()
