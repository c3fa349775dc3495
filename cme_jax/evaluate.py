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

Judges: `--judge-model SPEC` runs any model cme_jax loads locally (its chat template, greedy), or
`--judge-url URL --judge-name MODEL` calls an OpenAI-compatible chat completions endpoint, with the API
key read from the environment variable `--judge-key-env` names (default OPENAI_API_KEY). Verdicts, the
both-orders protocol and the cache are those of `cme_jax.judging`.

Everything lands in OUT: `model/model_outputs.json` and `baseline/model_outputs.json` (AlpacaEval's
format, so `alpaca_eval --model_outputs OUT/model/model_outputs.json --reference_outputs
OUT/baseline/model_outputs.json` works on them too), `judge_cache.jsonl`, `judgments.jsonl`,
`results.json`, `report.md`, `report.png` and, with `--verifier`, `automatic.jsonl` (per-prompt CME).
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

from cme_jax.checkpoint import CheckpointManager, checkpoint_dir
from cme_jax.errors import CmeError, cli_main
from cme_jax.generate import generate_responses
from cme_jax.judging import (
    FunctionJudge,
    Judge,
    JudgmentCache,
    Message,
    OpenAIJudge,
    PairItem,
    read_model_outputs,
    run_pairwise,
    summarize_records,
    write_model_outputs,
    write_results,
)
from cme_jax.metrics import distinct_n
from cme_jax.prompts import clean_prompt, heldout_score, prompt_key, read_prompt_texts
from cme_jax.sampling import SamplingConfig
from cme_jax.scoring import (
    Verifier,
    VerifierConfig,
    VerifierDtype,
    check_finite,
    default_verifier_name,
    load_verifier,
    resolve_dtype,
    score_texts,
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


def local_judge(
    model: LoadedModel | str,
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    dtype: VerifierDtype = "auto",
    progress: bool = False,
) -> FunctionJudge:
    """A judge run in JAX by any model cme_jax loads (a spec, `RUN_DIR[@STEP]`, or a loaded model), greedy.

    A spec is loaded on the first judging call, so a fully cached evaluation never loads it.
    """
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
    """Distinct-2 (whitespace words, comparable across tokenizers), mean lengths and the stop rate."""
    outs = side.outputs
    return {
        "distinct_2": distinct_n(outs, 2),
        "mean_length_characters": _mean([len(o) for o in outs]),
        "mean_length_words": _mean([len(o.split()) for o in outs]),
        "mean_length_tokens": _mean(side.num_tokens) if side.num_tokens is not None else None,
        "stopped_rate": _mean([float(s) for s in side.stopped]) if side.stopped is not None else None,
        "empty": sum(not o for o in outs),
    }


def automatic_metrics(
    prompts: Sequence[EvalPrompt],
    sides: Mapping[Side, SideOutputs],
    verifiers: Sequence[Verifier | VerifierConfig] = (),
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CME of both sides under each verifier (as `cme_jax.score` computes it), distinct-2 and lengths.

    Returns the `automatic` section of results.json and per-prompt rows. `cme_<name>` is the mean over
    non-empty outputs of the verifier's mean response log-prob; `cme` is the verifier-weighted sum;
    `cme_win_rate` is the share of prompts (both outputs non-empty) where the model's `cme` is higher,
    ties counting half. Configs are loaded one at a time and released after scoring.
    """
    instructions = [p.instruction for p in prompts]
    n = len(prompts)
    summary: dict[str, Any] = {"verifiers": [], **{s: side_text_metrics(sides[s]) for s in SIDES}}
    rows: list[dict[str, Any]] = [{"index": i, "instruction": ins} for i, ins in enumerate(instructions)]
    if not verifiers:
        return summary, rows
    texts = sides["model"].outputs + sides["baseline"].outputs
    stopped = [s for side in SIDES for s in (sides[side].stopped if sides[side].stopped is not None else [True] * n)]
    total = np.zeros(2 * n, np.float64)
    empty = np.array([not t for t in texts], bool)
    for v in verifiers:
        verifier = load_verifier(v) if isinstance(v, VerifierConfig) else v
        vc = verifier.config
        _say(progress, f"scoring {2 * n} outputs with verifier {vc.name} ({vc.model})")
        s = score_texts(verifier, instructions * 2, texts, stopped, batch_size=batch_size)
        check_finite(s.mean, ~s.empty, f"verifier {vc.name!r}")
        del verifier
        empty |= s.empty
        total += vc.weight * np.where(s.empty, 0.0, s.mean)
        summary["verifiers"].append(
            {"name": vc.name, "model": vc.model, "weight": vc.weight, "context": vc.context, "template": vc.template}
        )
        for k, side in enumerate(SIDES):
            part = slice(k * n, (k + 1) * n)
            ok = ~s.empty[part]
            summary[side][f"cme_{vc.name}"] = _mean(s.mean[part][ok].astype(np.float64).tolist())
            for i in range(n):
                rows[i][f"{side}_cme_{vc.name}"] = None if s.empty[part][i] else float(s.mean[part][i])
    for k, side in enumerate(SIDES):
        part = slice(k * n, (k + 1) * n)
        summary[side]["cme"] = _mean(total[part][~empty[part]].tolist())
        for i in range(n):
            rows[i][f"{side}_cme"] = None if empty[part][i] else float(total[part][i])
    both = ~empty[:n] & ~empty[n:]
    diff = total[:n][both] - total[n:][both]
    summary["cme_win_rate"] = _mean(((diff > 0) + 0.5 * (diff == 0)).tolist())
    summary["cme_compared"] = int(both.sum())
    return summary, rows


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def automatic_report(auto: dict[str, Any], model_name: str, base_name: str) -> str:
    """The markdown section for the automatic metrics."""
    m, b = auto["model"], auto["baseline"]
    lines = ["## Automatic metrics", "", f"| metric | {model_name} | {base_name} |", "|---|---|---|"]
    table: list[tuple[str, str, int | None]] = [
        (f"CME under `{v['model']}` (`{v['name']}`, weight {v['weight']:g})", f"cme_{v['name']}", 3)
        for v in auto["verifiers"]
    ]
    if len(auto["verifiers"]) > 1:
        table.append(("CME, weighted sum", "cme", 3))
    table += [
        ("distinct-2 (word bigrams)", "distinct_2", 3),
        ("mean length (characters)", "mean_length_characters", 1),
        ("mean length (words)", "mean_length_words", 1),
        ("mean length (own tokens)", "mean_length_tokens", 1),
        ("stopped before the token limit", "stopped_rate", None),
        ("empty outputs", "empty", 0),
    ]
    for label, key, digits in table:
        cells = [_pct(side[key]) if digits is None else _fmt(side[key], digits) for side in (m, b)]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines.append("")
    if auto["verifiers"]:
        lines += [
            f"{model_name}'s CME is higher than {base_name}'s on {_pct(auto.get('cme_win_rate'))} of "
            f"{auto.get('cme_compared', 0)} prompts (ties count half). CME is the mean per-token log-likelihood "
            "of an output under a frozen verifier (higher is more likely); bland, repetitive or cut-off text can "
            "score high, so read it beside distinct-2, length and the judge. Per-prompt values are in "
            "automatic.jsonl.",
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
    judge: Judge,
    out_dir: str | Path,
    *,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    verifiers: Sequence[Verifier | VerifierConfig] = (),
    seed: int = 0,
    batch_size: int = 16,
    retries_unparsed: int = 2,
    n_boot: int = 2000,
    regenerate: bool = False,
    truncate_left: bool = False,
    prompt_source: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate (or reuse) both sides' outputs, score them, judge every pair in both orders, write OUT.

    Models are loaded when first needed and each side's own model is released after it generated,
    so at most one policy, then one verifier, then the judge are held at a time. Returns the dict
    written to results.json.
    """
    if sampling.num_samples != 1:
        raise CmeError("evaluation compares one output per prompt; use num_samples=1")
    if batch_size < 1 or retries_unparsed < 0:
        raise CmeError("batch size must be >= 1 and unparsed retries >= 0")
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

    auto, auto_rows = automatic_metrics(prompts, sides, verifiers, batch_size=batch_size, progress=progress)

    items = [
        PairItem(p.instruction, m, b, p.dataset)
        for p, m, b in zip(prompts, sides["model"].outputs, sides["baseline"].outputs)
    ]
    cache_path = out / "judge_cache.jsonl"
    cache = JudgmentCache(cache_path)
    _say(progress, f"judging {len(items)} pairs in both orders ({len(cache)} judgments cached in {cache_path})")
    active: Judge = _ProgressJudge(judge) if progress else judge
    try:
        records = run_pairwise(items, active, cache, retries_unparsed=retries_unparsed)
    except CmeError as e:
        raise CmeError(
            f"{e} ({len(cache)} finished judgments are cached in {cache_path}; rerun the same command to resume)"
        ) from None
    summary = summarize_records(records, seed=seed, n_boot=n_boot)
    paths = write_results(out, records, summary, model.name, baseline.name, judge_id=judge.judge_id)

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
    rate = summary["win_rate_tie_adjusted"]
    _say(
        progress,
        f"{model.name} vs {baseline.name}: {summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses, "
        f"{summary['unparsed']} unparsed; tie-adjusted win rate {_pct(rate)}; report in {paths['report.md']}",
    )
    return results


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
    g = p.add_argument_group("judge (exactly one of --judge-model or --judge-url)")
    g.add_argument("--judge-model", help="model spec or RUN_DIR[@STEP] run locally as the judge")
    g.add_argument("--judge-url", help="base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1")
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
    g.add_argument("--verifier", action="append", default=[], help="verifier model spec for CME; repeatable")
    g.add_argument("--verifier-context", choices=["auto", "chat", "plain"], default="auto")
    g.add_argument("--verifier-template", default=DEFAULT_PLAIN_TEMPLATE, help="plain verifier context with {prompt}")
    g.add_argument("--verifier-max-length", type=int, default=1024, help="output tokens scored at most")
    return p


def build_judge(args: argparse.Namespace) -> Judge:
    """The judge the arguments name; CmeError for none, both, or missing settings (before anything loads)."""
    if (args.judge_model is None) == (args.judge_url is None):
        raise CmeError(
            "give exactly one judge: --judge-model SPEC (run locally) or --judge-url URL with --judge-name MODEL"
        )
    if args.judge_max_tokens is not None and args.judge_max_tokens < 1:
        raise CmeError(f"--judge-max-tokens must be >= 1, got {args.judge_max_tokens}")
    if args.judge_model is not None:
        for flag in ("judge_name", "judge_key_env"):
            if getattr(args, flag) is not None:
                raise CmeError(f"--{flag.replace('_', '-')} goes with --judge-url, not with --judge-model")
        return local_judge(
            args.judge_model,
            max_new_tokens=args.judge_max_tokens or 256,
            batch_size=args.judge_batch_size,
            dtype=args.dtype,
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
    for flag in ("batch_size", "judge_batch_size", "judge_concurrency", "bootstrap", "verifier_max_length"):
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
        verifiers = [
            VerifierConfig(
                model=spec,
                context=args.verifier_context,
                template=args.verifier_template,
                max_length=args.verifier_max_length,
            )
            for spec in args.verifier
        ]
    except ValueError as e:
        raise CmeError(str(e)) from None
    names = [v.name for v in verifiers]
    if len(set(names)) != len(names):
        raise CmeError(f"two verifiers are named {sorted(n for n in names if names.count(n) > 1)[0]!r}; give each once")
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
        n_boot=args.bootstrap,
        regenerate=args.regenerate,
        truncate_left=args.truncate_left,
        prompt_source=args.prompts,
    )


if __name__ == "__main__":
    main()
