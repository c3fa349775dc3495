"""The evaluation as a library: prompts, policies, cached generation, automatic metrics, judging and reports
(the command is `python -m cme_jax.evaluate`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cme_jax.checkpoint import RunCheckpoint, model_source
from cme_jax.errors import CmeError
from cme_jax.eval.audit import FORMS, form_scores, score_forms
from cme_jax.eval.judging import (
    EARLY_STOP_PAIRS,
    JsonlCache,
    Judge,
    PairItem,
    UnusableJudgeError,
    audit_sentence,
    judge_audit,
    read_model_outputs,
    run_pairwise,
    summarize_records,
    write_model_outputs,
    write_results,
)
from cme_jax.eval.stats import interval, paired_interval, pct
from cme_jax.metrics import distinct_n, repetition_rate
from cme_jax.prompts import clean_prompt, heldout_score, prompt_key, read_prompt_texts
from cme_jax.rewards import RewardInputs, cme_config, combine_host
from cme_jax.sampling import SamplingConfig, generate_responses
from cme_jax.scoring import (
    Verifier,
    VerifierConfig,
    VerifierDtype,
    default_verifier_name,
    load_verifier,
)
from cme_jax.sources import LoadedModel
from cme_jax.tokens import (
    DEFAULT_PLAIN_TEMPLATE,
    VERBATIM_TEMPLATE,
    Message,
    PromptFormat,
    as_verbatim_prompt,
    format_prompt,
    has_chat_template,
)

Side = Literal["model", "baseline"]
SIDES: tuple[Side, ...] = ("model", "baseline")

ALPACA_EVAL_SPECS = ("alpaca_eval", "tatsu-lab/alpaca_eval", "hf:tatsu-lab/alpaca_eval")
ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
ALPACA_EVAL_FILE = "alpaca_eval.json"
OUTPUTS_FILE = "model_outputs.json"
SETTINGS_FILE = "generation.json"
DEFAULT_SAMPLING = SamplingConfig(max_new_tokens=512, temperature=0.0)


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


def is_outputs_file(spec: str) -> bool:
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
    if is_outputs_file(spec):
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
        source, loader, run = model_source(spec, dtype)
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
        reference = model_source(reference, "auto")[1]()
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
    score_cache: JsonlCache | None = None,
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
        cells = [pct(side.get(key)) if digits is None else _fmt(side.get(key), digits) for side in (m, b)]
        d = iv.get(ikey) if ikey else None
        diff = _with_ci(d["difference"], 3 if digits is None else max(digits, 3)) if d and "difference" in d else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {diff} |")
    lines.append("")
    if auto["verifiers"]:
        lines += [
            f"{model_name}'s CME is higher than {base_name}'s on {pct(auto.get('cme_win_rate'))} of "
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
    audit_set = judge_audit_pairs(audit_pairs) if audit_pairs else None
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
        score_cache=JsonlCache(out / "score_cache.jsonl" if score_cache is None else score_cache),
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
        cache = JsonlCache(cache_path)
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
        f"{summary['unparsed']} unparsed; tie-adjusted win rate {pct(rate)}; report in {paths['report.md']}",
    )
    return results


def judge_audit_pairs(n: int) -> list[Any]:
    """The first n shipped preference pairs for the judge audit; CmeError when n is out of range."""
    from cme_jax.eval.audit import shipped_pairs

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
