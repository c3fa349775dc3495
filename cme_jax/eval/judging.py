"""Head-to-head LLM-judge evaluation: pairwise prompts, verdict parsing, win rates and reports.

This module is the model-independent half of evaluation. It knows nothing about JAX or the policies:
it turns (instruction, model output, baseline output) triples into judge conversations, sends them to
any `Judge`, caches every finished judgment, and turns the verdicts into AlpacaEval-compatible
numbers and files.

Protocol, in one screen:

- Every pair is judged twice: order 1 shows the model as A and the baseline as B, order 2 swaps them.
- The judge must end its reply with `[[A]]`, `[[B]]` or `[[C]]` (tie); `parse_verdict` reads it.
  When several different tags appear, the last one counts, except that a trailing run of different
  tags ("[[A]] or [[B]]", the options restated) is ambiguous and unparsed.
- An unparsed reply is retried (up to `retries_unparsed` times) with a short follow-up asking for the
  verdict alone; if an order stays unparsed the pair counts as unparsed: excluded from `n` and the
  win rate, counted in `unparsed`, and listed in the report and `judgments.jsonl`. One parsed order
  is not used alone, because a single order carries the judge's position bias.
- `combine`: the model wins a pair only if both orders prefer it, loses only if both prefer the
  baseline; everything else (tie in both, split verdicts, a win and a tie) scores 0.5.
- `win_rate_tie_adjusted` = (wins + 0.5 ties) / n, which is AlpacaEval's discrete win rate (as a
  fraction, not a percentage) with AlpacaEval preference = 1 + score.
- A judge with `verdict_only` gets the verdict-only variant of the prompt (`[[A]]` or `[[B]]`, no
  reasoning), e.g. a local model whose verdict is the likelier next letter after a prefilled "[[".
- Early stop (`run_pairwise(..., early_stop=K)`): the first K pairs are judged first; if more than half
  stay unparsed the run stops with `UnusableJudgeError` instead of paying for the rest.
- `judge_audit` scores the judge itself on preference pairs (chosen as the model, rejected as the
  baseline) through the same protocol and cache: its accuracy is the tie-adjusted win rate of `chosen`.
  `write_results(..., audit=...)` puts it beside the win rate, which is worth what the judge is worth.

Typical use (the model-dependent glue supplies the outputs and, optionally, a local judge):

    items = pair_items(read_model_outputs("model.json"), read_model_outputs("base.json"))
    judge = OpenAIJudge(base_url="https://api.example.com/v1", model="gpt-4o", api_key_env="JUDGE_KEY")
    summary = judge_and_report(items, judge, out_dir, model_name="policy", base_name="base")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from cme_jax.checkpoint import model_source
from cme_jax.endpoints import JsonEndpoint, Transient, map_concurrently
from cme_jax.errors import CmeError
from cme_jax.eval.stats import bootstrap_ci, pct
from cme_jax.files import JsonlCache
from cme_jax.sampling import SamplingConfig, generate_responses
from cme_jax.scoring import VerifierDtype
from cme_jax.sources import LoadedModel
from cme_jax.tokens import VERBATIM_TEMPLATE, Message, has_chat_template, render_conversation

VerdictMode = Literal["generate", "likelihood"]


VERDICT_MODES: tuple[VerdictMode, ...] = ("generate", "likelihood")


# The likelihood verdict: the judge's assistant turn is prefilled with this, and the verdict is whichever
# letter is the likelier next token.
VERDICT_PREFILL = "[["


VERDICT_LETTERS = ("A", "B")


_VERDICT_JITS: dict[str, Any] = {}

log = logging.getLogger(__name__)

Verdict = Literal["A", "B", "C"]

# ----------------------------------------------------------------------------- prompts

JUDGE_SYSTEM = (
    "You are an impartial evaluator of AI assistants. You compare two responses to the same user "
    "instruction and decide which one serves the user better. Judge helpfulness, correctness, "
    "faithfulness to the instruction and clarity. Do not reward length for its own sake, do not let "
    "the order in which the responses are shown influence you, and do not favour either assistant "
    "by name or style. Think briefly, then give your verdict."
)

PAIRWISE_TEMPLATE = """\
Compare the two responses to the instruction below.

<instruction>
{instruction}
</instruction>

<response_a>
{output_a}
</response_a>

<response_b>
{output_b}
</response_b>

Explain your reasoning in a few sentences. Then end your reply with a line holding only your verdict:
A if response A is better, B if response B is better, C if they are equally good, written in double
brackets as one of [[A]], [[B]] or [[C]]."""

# The template lists the tags as one run of different verdicts, so a judge that merely echoes the
# instructions parses as unparsed rather than as a verdict.

# Sent after an unparsed reply: a different conversation, so even a greedy judge can answer differently.
UNPARSED_FOLLOWUP = (
    "Your reply did not end with a verdict in the required form. Answer with the verdict only: [[A]], [[B]] or [[C]]."
)

# The verdict-only variant, for judges that answer with the verdict alone (the likelihood verdict of a local
# model reads the next token after an assistant turn prefilled with "[["): no reasoning, no tie option.
JUDGE_SYSTEM_VERDICT = JUDGE_SYSTEM.replace("Think briefly, then give your verdict.", "Give your verdict only.")

PAIRWISE_VERDICT_TEMPLATE = PAIRWISE_TEMPLATE[: PAIRWISE_TEMPLATE.index("Explain your reasoning")] + (
    "Which response is better? Answer with the verdict only, in double brackets: [[A]] if response A is better, "
    "[[B]] if response B is better."
)


def render_pairwise(instruction: str, output_a: str, output_b: str, *, verdict_only: bool = False) -> list[Message]:
    """Build the chat conversation that asks the judge to compare output A with output B.

    `verdict_only` asks for the bare verdict [[A]] or [[B]] instead of reasoning followed by a verdict.
    """
    system, template = (
        (JUDGE_SYSTEM_VERDICT, PAIRWISE_VERDICT_TEMPLATE) if verdict_only else (JUDGE_SYSTEM, PAIRWISE_TEMPLATE)
    )
    user = template.format(instruction=instruction, output_a=output_a, output_b=output_b)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------- verdicts

# `[[A]]` with tolerance for case, inner whitespace, markdown emphasis inside the brackets and
# backslash-escaped brackets (`\[\[A\]\]`, common in markdown-happy judges). Single brackets are not
# accepted: "[A]" is how judges refer to the responses in their reasoning.
_TAG = re.compile(r"\\?\[\s*\\?\[\s*[*_`]*\s*([abc])\s*[*_`]*\s*\\?\]\s*\\?\]", re.IGNORECASE)
# What may separate the tags of one run: punctuation, markdown, whitespace, "or"/"and"/"vs".
_RUN_GAP = re.compile(r"^(?:[\s,;:/|*_`.\-]|\bor\b|\band\b|\bvs\b)*$", re.IGNORECASE)


def parse_verdict(text: str | None) -> Verdict | None:
    """Return the judge's final verdict "A", "B" or "C" (tie), or None when there is none or it is ambiguous.

    The last tag counts (judges often mention tags while reasoning or restate the options before
    deciding), unless the final run of adjacent tags names different verdicts ("[[A]] or [[B]]",
    "[[A]], [[B]], [[C]]"): that is the options restated or a hedge, so the reply is unparsed.
    """
    if not text:
        return None
    matches = list(_TAG.finditer(text))
    if not matches:
        return None
    run = [matches[-1]]
    for prev in reversed(matches[:-1]):
        if not _RUN_GAP.match(text[prev.end() : run[-1].start()]):
            break
        run.append(prev)
    letters = {m.group(1).upper() for m in run}
    if len(letters) > 1:
        return None
    return letters.pop()  # type: ignore[return-value]


def order_scores(verdict_model_as_a: Verdict, verdict_model_as_b: Verdict) -> tuple[float, float]:
    """Per-order scores of the model (1 win, 0.5 tie, 0 loss), un-swapping the second order."""
    first = {"A": 1.0, "B": 0.0, "C": 0.5}[verdict_model_as_a]
    second = {"A": 0.0, "B": 1.0, "C": 0.5}[verdict_model_as_b]
    return first, second


def combine(verdict_model_as_a: Verdict | None, verdict_model_as_b: Verdict | None) -> float | None:
    """The model's combined score for a prompt: 1 win, 0 loss, 0.5 tie or split, None if an order is unparsed.

    `verdict_model_as_a` is the verdict of order 1 (model shown as A), `verdict_model_as_b` of
    order 2 (model shown as B). A win or a loss needs both orders to agree; anything else is a tie.
    """
    if verdict_model_as_a is None or verdict_model_as_b is None:
        return None
    first, second = order_scores(verdict_model_as_a, verdict_model_as_b)
    if first == second:
        return first
    return 0.5


def alpaca_preference(score: float) -> float:
    """AlpacaEval's preference encoding of a combined score: 1 baseline wins, 1.5 tie, 2 model wins."""
    return 1.0 + score


# ----------------------------------------------------------------------------- statistics


def summarize(
    verdicts: Sequence[tuple[Verdict | None, Verdict | None]],
    model_lengths: Sequence[float],
    base_lengths: Sequence[float],
    *,
    seed: int = 0,
    n_boot: int = 2000,
    length_unit: str = "characters",
) -> dict[str, Any]:
    """The numbers of results.json from per-prompt (model-as-A, model-as-B) verdicts and output lengths.

    Takes verdict pairs rather than combined scores because position consistency needs both orders.
    Rates are fractions in [0, 1]; they are None when no pair was parsed.
    """
    if not (len(verdicts) == len(model_lengths) == len(base_lengths)):
        raise ValueError("verdicts, model_lengths and base_lengths must have the same length")
    scores: list[float] = []
    consistent = 0
    first_position = decisive = 0
    for v_a, v_b in verdicts:
        s = combine(v_a, v_b)
        if s is None:
            continue
        scores.append(s)
        first, second = order_scores(v_a, v_b)  # type: ignore[arg-type]
        consistent += first == second
        # How often a decisive verdict picks whatever was shown first: 0.5 means no position bias.
        for v in (v_a, v_b):
            if v != "C":
                decisive += 1
                first_position += v == "A"
    n = len(scores)
    wins = sum(s == 1.0 for s in scores)
    ties = sum(s == 0.5 for s in scores)
    losses = sum(s == 0.0 for s in scores)
    ci = bootstrap_ci(scores, seed=seed, n_boot=n_boot)
    return {
        "n": n,
        "n_total": len(verdicts),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "unparsed": len(verdicts) - n,
        "win_rate_tie_adjusted": (wins + 0.5 * ties) / n if n else None,
        "ci95_low": ci[0] if ci else None,
        "ci95_high": ci[1] if ci else None,
        "position_consistency": consistent / n if n else None,
        "first_position_rate": first_position / decisive if decisive else None,
        "model_mean_length": float(np.mean(model_lengths)) if len(model_lengths) else None,
        "base_mean_length": float(np.mean(base_lengths)) if len(base_lengths) else None,
        "length_unit": length_unit,
        "bootstrap_resamples": n_boot,
        "seed": seed,
    }


# ----------------------------------------------------------------------------- judges


class Judge(Protocol):
    """Anything that answers judge conversations: an HTTP endpoint, a local model, a test double."""

    @property
    def judge_id(self) -> str:
        """Identifies the judge model and its decoding settings; part of every cache key."""
        ...

    def judge(
        self, conversations: Sequence[list[Message]], on_result: Callable[[int, str], None] | None = None
    ) -> list[str]:
        """Return the judge's reply text for each conversation, in order.

        Call `on_result(i, text)` as soon as reply i is final (per request, or per batch for a local
        model) so it can be cached before anything else can fail; implementations that never call it
        still work, they just cache at the end of the call.
        """
        ...


@dataclasses.dataclass
class FunctionJudge:
    """Adapts a plain function from conversations to reply texts into a `Judge` (local models, tests).

    `verdict_only` asks `run_pairwise` for the verdict-only conversations (`render_pairwise(...,
    verdict_only=True)`), for judges that answer with the bare verdict.
    """

    fn: Callable[[Sequence[list[Message]]], list[str]]
    judge_id: str
    batch_size: int = 16
    verdict_only: bool = False

    def judge(
        self, conversations: Sequence[list[Message]], on_result: Callable[[int, str], None] | None = None
    ) -> list[str]:
        """Call `fn` batch by batch, reporting each batch's replies as soon as it returns."""
        out: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            replies = list(self.fn(conversations[start : start + self.batch_size]))
            for j, text in enumerate(replies):
                if on_result is not None:
                    on_result(start + j, text)
            out.extend(replies)
        return out


@dataclasses.dataclass
class OpenAIJudge:
    """A judge behind any OpenAI-compatible `/chat/completions` endpoint, called with the standard library.

    The API key is read once, at construction, from the environment variable named by `api_key_env`
    (None: send no key, for local servers). It is sent only as a Bearer header; it is kept out of
    repr, logs, error messages and the cache.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 5
    backoff: float = 1.0
    timeout: float = 120.0
    temperature: float = 0.0
    max_tokens: int = 1024
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or self.max_retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise CmeError("judge: max_concurrency must be >= 1, max_retries >= 0, backoff >= 0 and timeout > 0")
        # A plain attribute, not a dataclass field: repr(), asdict() and == never see the key it holds.
        self._endpoint = JsonEndpoint(
            self.base_url.rstrip("/") + "/chat/completions",
            label="judge",
            api_key_env=self.api_key_env,
            max_retries=self.max_retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            timeout=self.timeout,
        )

    @property
    def judge_id(self) -> str:
        """Endpoint, model and decoding settings: a different judge never reuses another's cache."""
        return (
            f"openai-chat|{self.base_url.rstrip('/')}|{self.model}|"
            f"temperature={self.temperature}|max_tokens={self.max_tokens}"
        )

    def complete(self, messages: list[Message]) -> str:
        """One conversation with retries and exponential backoff; CmeError when the endpoint keeps failing."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        return self._endpoint.post(body, _reply_text)

    def judge(
        self, conversations: Sequence[list[Message]], on_result: Callable[[int, str], None] | None = None
    ) -> list[str]:
        """Send all conversations with at most `max_concurrency` in flight; report each reply as it lands.

        When one request fails for good, the queued ones are cancelled but those already in flight
        are awaited and reported (so they get cached), then the first error is raised.
        """
        return map_concurrently(self.complete, conversations, self.max_concurrency, on_result)


def _reply_text(reply: Any) -> str:
    """The text of a chat completion; Transient for anything else (a gateway's HTML page, a truncated body)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise Transient("response is not a chat completion") from None
    # A null content (e.g. a refusal) is an empty reply: unparsed, and retried as such.
    return content if isinstance(content, str) else ""


# ----------------------------------------------------------------------------- cache


def cache_key(judge_id: str, messages: list[Message]) -> str:
    """Stable hash of (judge, full conversation): any change to prompt, outputs or judge is a miss."""
    blob = json.dumps({"judge": judge_id, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- pairwise runs


@dataclasses.dataclass(frozen=True)
class PairItem:
    """One prompt to judge: the instruction and both sides' outputs."""

    instruction: str
    model_output: str
    base_output: str
    dataset: str | None = None


@dataclasses.dataclass
class PairRecord:
    """Both verdicts of one prompt, the raw judge replies behind them and the combined score."""

    index: int
    instruction: str
    model_output: str
    base_output: str
    dataset: str | None
    verdict_model_as_a: Verdict | None
    verdict_model_as_b: Verdict | None
    judge_output_model_as_a: list[str]  # every reply of order 1, retries included
    judge_output_model_as_b: list[str]
    model_length: float
    base_length: float

    @property
    def score(self) -> float | None:
        """Combined score of the model: 1, 0.5, 0, or None when unparsed."""
        return combine(self.verdict_model_as_a, self.verdict_model_as_b)

    @property
    def outcome(self) -> str:
        """ "win", "tie", "loss" or "unparsed"."""
        s = self.score
        return "unparsed" if s is None else {1.0: "win", 0.5: "tie", 0.0: "loss"}[s]

    def to_json(self) -> dict[str, Any]:
        """One line of judgments.jsonl, with AlpacaEval's `preference` (1 base, 1.5 tie, 2 model, null)."""
        s = self.score
        return {
            "index": self.index,
            "instruction": self.instruction,
            "dataset": self.dataset,
            "model_output": self.model_output,
            "base_output": self.base_output,
            "verdict_model_as_a": self.verdict_model_as_a,
            "verdict_model_as_b": self.verdict_model_as_b,
            "score": s,
            "outcome": self.outcome,
            "preference": None if s is None else alpaca_preference(s),
            "model_length": self.model_length,
            "base_length": self.base_length,
            "judge_output_model_as_a": self.judge_output_model_as_a,
            "judge_output_model_as_b": self.judge_output_model_as_b,
        }


IDENTICAL_NOTE = "(identical outputs: tie without asking the judge)"

# Pairs judged first, in both orders, to catch a judge that cannot give verdicts (see `run_pairwise`).
EARLY_STOP_PAIRS = 8


class UnusableJudgeError(CmeError):
    """The judge left most of the first pairs without a verdict; the run stopped instead of paying for the rest."""


def run_pairwise(
    items: Sequence[PairItem],
    judge: Judge,
    cache: JsonlCache,
    *,
    retries_unparsed: int = 2,
    tie_identical: bool = True,
    length_fn: Callable[[str], float] = len,
    early_stop: int = 0,
    verdict_only: bool | None = None,
) -> list[PairRecord]:
    """Judge every item in both orders, cache first, retrying unparsed replies; one record per item.

    Rounds: round 0 asks every (item, order) its pairwise conversation; round r > 0 re-asks the ones
    still unparsed, continuing the conversation with each previous reply and `UNPARSED_FOLLOWUP`. Each
    round looks every conversation up in the cache and sends only the misses (deduplicated) to the
    judge; each reply is cached the moment the judge reports it, so an interrupted run resumes
    without asking anything twice. With `tie_identical`, a pair whose two outputs are equal (after
    stripping whitespace) is a tie in both orders without a judge call, as AlpacaEval does.

    With `early_stop=K > 0` and more than K items, the first K items are judged (rounds, retries and
    all) before any other; if more than half of them stay unparsed, `UnusableJudgeError` (one line)
    is raised without asking anything about the rest, their judgments kept in the cache.
    `verdict_only` (default: the judge's own `verdict_only` attribute, else False) sends the
    verdict-only conversations of `render_pairwise`.
    """
    judge_id = judge.judge_id
    if early_stop < 0:
        raise CmeError(f"early_stop must be >= 0, got {early_stop}")
    if verdict_only is None:
        verdict_only = bool(getattr(judge, "verdict_only", False))
    base: dict[tuple[int, int], list[Message]] = {}
    replies: dict[tuple[int, int], list[str]] = {}
    verdicts: dict[tuple[int, int], Verdict | None] = {}
    for i, it in enumerate(items):
        for order in (0, 1):
            replies[(i, order)] = []
            if tie_identical and it.model_output.strip() == it.base_output.strip():
                replies[(i, order)].append(IDENTICAL_NOTE)
                verdicts[(i, order)] = "C"
                continue
            a, b = (it.model_output, it.base_output) if order == 0 else (it.base_output, it.model_output)
            base[(i, order)] = render_pairwise(it.instruction, a, b, verdict_only=verdict_only)
            verdicts[(i, order)] = None

    if 0 < early_stop < len(items):
        _judge_rounds([k for k in base if k[0] < early_stop], base, replies, verdicts, judge, cache, retries_unparsed)
        bad = sum(verdicts[(i, 0)] is None or verdicts[(i, 1)] is None for i in range(early_stop))
        if 2 * bad > early_stop:
            raise UnusableJudgeError(
                f"judge {judge_id} gave no parseable verdict on {bad} of the first {early_stop} pairs (both orders, "
                f"{retries_unparsed} follow-ups each), so it was stopped before the other {len(items) - early_stop}; "
                "use a stronger judge, an API judge (--judge-url) or the likelihood verdict "
                "(--judge-verdict likelihood)"
            )
        _judge_rounds([k for k in base if k[0] >= early_stop], base, replies, verdicts, judge, cache, retries_unparsed)
    else:
        _judge_rounds(list(base), base, replies, verdicts, judge, cache, retries_unparsed)

    records = []
    for i, it in enumerate(items):
        records.append(
            PairRecord(
                index=i,
                instruction=it.instruction,
                model_output=it.model_output,
                base_output=it.base_output,
                dataset=it.dataset,
                verdict_model_as_a=verdicts[(i, 0)],
                verdict_model_as_b=verdicts[(i, 1)],
                judge_output_model_as_a=replies[(i, 0)],
                judge_output_model_as_b=replies[(i, 1)],
                model_length=float(length_fn(it.model_output)),
                base_length=float(length_fn(it.base_output)),
            )
        )
    unparsed = sum(r.score is None for r in records)
    if unparsed:
        log.warning("%d of %d pairs stayed unparsed after %d retries", unparsed, len(records), retries_unparsed)
    return records


def _judge_rounds(
    subset: Sequence[tuple[int, int]],
    base: Mapping[tuple[int, int], list[Message]],
    replies: dict[tuple[int, int], list[str]],
    verdicts: dict[tuple[int, int], Verdict | None],
    judge: Judge,
    cache: JsonlCache,
    retries_unparsed: int,
) -> None:
    """The rounds of `run_pairwise` for some (item, order) keys; fills `replies` and `verdicts` in place."""
    judge_id = judge.judge_id
    for round_ in range(retries_unparsed + 1):
        pending = [k for k in subset if verdicts[k] is None and len(replies[k]) == round_]
        if not pending:
            break
        conv: dict[tuple[int, int], list[Message]] = {}
        for k in pending:
            # Continue the whole conversation: each retry differs from the last, so it is neither a
            # cache hit nor (for a greedy judge) a guaranteed repeat of the same reply.
            msgs = list(base[k])
            for previous in replies[k]:
                msgs += [
                    {"role": "assistant", "content": previous},
                    {"role": "user", "content": UNPARSED_FOLLOWUP},
                ]
            conv[k] = msgs
        keys = {k: cache_key(judge_id, m) for k, m in conv.items()}
        misses: dict[str, list[Message]] = {}
        for k, ck in keys.items():
            if ck not in cache and ck not in misses:
                misses[ck] = conv[k]
        hits = len(set(keys.values())) - len(misses)
        log.info("judging round %d: %d conversations, %d cached, %d to ask", round_, len(conv), hits, len(misses))
        if misses:
            miss_keys = list(misses)

            def on_result(j: int, text: str, miss_keys: list[str] = miss_keys) -> None:
                cache.put(miss_keys[j], judge_id, text if isinstance(text, str) else "")

            texts = judge.judge([misses[ck] for ck in miss_keys], on_result=on_result)
            if len(texts) != len(miss_keys):
                raise CmeError(f"judge {judge_id} returned {len(texts)} replies for {len(miss_keys)} prompts")
            for ck, text in zip(miss_keys, texts):
                cache.put(ck, judge_id, text if isinstance(text, str) else "")  # no-op when on_result already stored it
        for k, ck in keys.items():
            text = cache.get(ck)
            assert text is not None
            replies[k].append(text)
            verdicts[k] = parse_verdict(text)


def summarize_records(
    records: Sequence[PairRecord], *, seed: int = 0, n_boot: int = 2000, length_unit: str = "characters"
) -> dict[str, Any]:
    """`summarize` applied to the records of `run_pairwise`."""
    return summarize(
        [(r.verdict_model_as_a, r.verdict_model_as_b) for r in records],
        [r.model_length for r in records],
        [r.base_length for r in records],
        seed=seed,
        n_boot=n_boot,
        length_unit=length_unit,
    )


# ----------------------------------------------------------------------------- judge audit


class PreferenceLike(Protocol):
    """A prompt with a better (`chosen`) and a worse (`rejected`) response, e.g. `cme_jax.eval.audit.PreferencePair`."""

    @property
    def prompt(self) -> str: ...

    @property
    def chosen(self) -> str: ...

    @property
    def rejected(self) -> str: ...


def judge_audit(
    judge: Judge,
    pairs: Sequence[PreferenceLike],
    cache: JsonlCache,
    *,
    retries_unparsed: int = 2,
    early_stop: int = EARLY_STOP_PAIRS,
    seed: int = 0,
    n_boot: int = 2000,
    source: str = "builtin:preference_pairs",
) -> dict[str, Any]:
    """How well the judge itself separates a better answer from a worse one, through the same protocol.

    Each pair is judged in both orders by `run_pairwise` (so with its cache, retries and early stop),
    `chosen` playing the model and `rejected` the baseline. `accuracy` is the tie-adjusted win rate of
    `chosen` (a split verdict counts half), with its bootstrap interval over pairs; the per-order
    accuracies are the share of scored pairs whose verdict in that order picks `chosen` (a tie half);
    `position_consistency` is the share of scored pairs where both orders agree, `first_position_rate` the
    share of decisive verdicts that pick whatever was shown first. Rates are None when nothing was scored.
    """
    if not pairs:
        raise CmeError("the judge audit needs at least one preference pair")
    items = [PairItem(p.prompt, p.chosen, p.rejected) for p in pairs]
    records = run_pairwise(items, judge, cache, retries_unparsed=retries_unparsed, early_stop=early_stop)
    s = summarize_records(records, seed=seed, n_boot=n_boot)
    per_order = [order_scores(r.verdict_model_as_a, r.verdict_model_as_b) for r in records if r.score is not None]  # type: ignore[arg-type]
    first = [a for a, _ in per_order]
    second = [b for _, b in per_order]
    return {
        "judge": judge.judge_id,
        "source": source,
        "pairs": len(items),
        "n": s["n"],
        "accuracy": s["win_rate_tie_adjusted"],
        "ci95_low": s["ci95_low"],
        "ci95_high": s["ci95_high"],
        "accuracy_chosen_first": float(np.mean(first)) if first else None,
        "accuracy_chosen_second": float(np.mean(second)) if second else None,
        "position_consistency": s["position_consistency"],
        "first_position_rate": s["first_position_rate"],
        "unparsed": s["unparsed"],
        "bootstrap_resamples": n_boot,
        "seed": seed,
    }


def audit_sentence(audit: Mapping[str, Any]) -> str:
    """One markdown paragraph saying what the judge is worth, to be read beside any win rate it produced."""
    what = "shipped preference pairs" if audit.get("source") == "builtin:preference_pairs" else "preference pairs"
    if not audit["n"]:
        return (
            f"**Judge audit:** the judge gave no usable verdict on any of {audit['pairs']} {what}, so nothing it "
            "says separates the policies."
        )
    acc, lo, hi = audit["accuracy"], audit["ci95_low"], audit["ci95_high"]
    text = (
        f"**Judge audit:** judge accuracy on {audit['n']} {what} (the better answer preferred, both orders, "
        f"split verdicts half): **{pct(acc)}** [{pct(lo)}, {pct(hi)}]; with the better answer shown first "
        f"{pct(audit['accuracy_chosen_first'])}, second {pct(audit['accuracy_chosen_second'])}; position "
        f"consistency {pct(audit['position_consistency'])}; picks the first-shown answer in "
        f"{pct(audit['first_position_rate'])} of decisive verdicts"
    )
    if audit["unparsed"]:
        text += f"; {audit['unparsed']} of {audit['pairs']} pairs unparsed"
    text += ". "
    if lo is not None and lo <= 0.5:
        text += (
            "Its interval reaches 50%: this judge cannot reliably tell a better answer from a worse one, so its "
            "win rate says little about which policy is better."
        )
    else:
        text += "Read every win rate beside this accuracy: a judge near 50% cannot separate the policies."
    return text


# ----------------------------------------------------------------------------- files


def write_model_outputs(
    path: str | os.PathLike[str],
    instructions: Sequence[str],
    outputs: Sequence[str],
    generator: str,
    dataset: str | Sequence[str | None] | None = None,
) -> None:
    """Write AlpacaEval's model_outputs.json: a list of {instruction, output, generator[, dataset]}."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    if dataset is None or isinstance(dataset, str):
        datasets: Sequence[str | None] = [dataset] * len(outputs)
    else:
        datasets = dataset
        if len(datasets) != len(outputs):
            raise ValueError(f"{len(datasets)} dataset names but {len(outputs)} outputs")
    rows = []
    for ins, out, ds in zip(instructions, outputs, datasets):
        row = {"instruction": ins, "output": out, "generator": generator}
        if ds is not None:
            row["dataset"] = ds
        rows.append(row)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_model_outputs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read an AlpacaEval model_outputs.json (or .jsonl) file; each row needs an instruction and an output."""
    from cme_jax.files import read_records

    p = Path(path)
    rows = [row for _, row in read_records(p, "model outputs")]
    for j, row in enumerate(rows):
        if not isinstance(row.get("instruction"), str) or "output" not in row:
            raise CmeError(f"model outputs {p}: entry {j} lacks a string 'instruction' or an 'output'")
    return rows


def pair_items(model_rows: Iterable[Mapping[str, Any]], base_rows: Iterable[Mapping[str, Any]]) -> list[PairItem]:
    """Match two AlpacaEval output lists by instruction (in the model's order) into PairItems."""
    base_by_instruction: dict[str, Mapping[str, Any]] = {}
    for row in base_rows:
        base_by_instruction.setdefault(row["instruction"], row)
    items, missing = [], 0
    for row in model_rows:
        other = base_by_instruction.get(row["instruction"])
        if other is None:
            missing += 1
            continue
        items.append(
            PairItem(
                instruction=row["instruction"],
                model_output=str(row["output"] or ""),
                base_output=str(other["output"] or ""),
                dataset=row.get("dataset") or other.get("dataset"),
            )
        )
    if missing:
        raise CmeError(f"{missing} model instructions have no baseline output; generate both on the same prompts")
    return items


def _report_md(
    records: Sequence[PairRecord],
    s: dict[str, Any],
    model: str,
    base: str,
    judge: str | None,
    audit: Mapping[str, Any] | None = None,
) -> str:
    """The human-readable report; a judge audit, when given, sits right after the win rate."""
    unit = s.get("length_unit", "characters")
    lines = [f"# {model} vs {base}", ""]
    if s["n"]:
        sentence = (
            f"Judged in both orders{f' by `{judge}`' if judge else ''}, **{model}** beats **{base}** on "
            f"{s['wins']} of {s['n']} prompts, ties {s['ties']} and loses {s['losses']}: a tie-adjusted "
            f"win rate of **{pct(s['win_rate_tie_adjusted'])}** (95% bootstrap interval "
            f"{pct(s['ci95_low'])} to {pct(s['ci95_high'])})."
        )
    else:
        sentence = f"No pair could be scored: the judge gave no usable verdict on any of {s['n_total']} prompts."
    if s["unparsed"]:
        u = s["unparsed"]
        sentence += (
            f" {u} of {s['n_total']} pairs got no parseable verdict after retries; "
            f"{'it is' if u == 1 else 'they are'} excluded from the rate and listed below."
        )
    lines += [sentence, ""]
    if audit is not None:
        lines += [audit_sentence(audit), ""]
    lines += [
        "| metric | value |",
        "|---|---|",
        f"| prompts judged | {s['n_total']} |",
        f"| scored pairs (n) | {s['n']} |",
        f"| wins | {s['wins']} |",
        f"| ties (incl. split verdicts) | {s['ties']} |",
        f"| losses | {s['losses']} |",
        f"| unparsed | {s['unparsed']} |",
        f"| win rate, tie-adjusted | {pct(s['win_rate_tie_adjusted'])} |",
        f"| 95% CI (bootstrap over prompts) | {pct(s['ci95_low'])} to {pct(s['ci95_high'])} |",
        f"| position consistency | {pct(s['position_consistency'])} |",
        f"| judge picks the first-shown output | {pct(s.get('first_position_rate'))} |",
        f"| mean length, {model} ({unit}) | {_num(s['model_mean_length'])} |",
        f"| mean length, {base} ({unit}) | {_num(s['base_mean_length'])} |",
        "",
    ]
    ml, bl = s["model_mean_length"], s["base_mean_length"]
    if ml and bl and max(ml / bl, bl / ml) >= 1.5:
        longer, ratio = (model, ml / bl) if ml > bl else (base, bl / ml)
        lines += [
            f"Note: {longer}'s outputs are {ratio:.1f}x as long on average. LLM judges tend to favour longer "
            "answers, so weigh the win rate against the length difference.",
            "",
        ]
    if s["position_consistency"] is not None and s["position_consistency"] < 0.6:
        lines += [
            "Note: the judge agrees with itself after swapping the order on fewer than 60% of pairs; its "
            "verdicts are close to noise on this set.",
            "",
        ]
    lines += ["![win/tie/loss and output lengths](report.png)", ""]
    bad = [r for r in records if r.score is None]
    if bad:
        lines += ["## Unparsed pairs", "", "| index | instruction | failed order(s) |", "|---|---|---|"]
        for r in bad:
            orders = [
                name
                for name, v in (("model as A", r.verdict_model_as_a), ("model as B", r.verdict_model_as_b))
                if v is None
            ]
            lines.append(f"| {r.index} | {_cell(r.instruction)} | {', '.join(orders)} |")
        lines.append("")
    lines += [
        "Scoring: each prompt is judged twice with the outputs swapped; a win or loss needs both orders to "
        "agree, anything else counts as a tie. Win rate = (wins + 0.5 ties) / n. Per-prompt verdicts and "
        "the judge's replies are in judgments.jsonl.",
        "",
    ]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    """A mean length for the table."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _cell(text: str, limit: int = 80) -> str:
    """Text shortened and escaped for one markdown table cell."""
    t = " ".join(text.split()).replace("|", "\\|")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _report_png(path: Path, records: Sequence[PairRecord], s: dict[str, Any], model: str, base: str) -> None:
    """Win/tie/loss bars and the two length distributions, drawn with matplotlib's Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CmeError("report.png needs matplotlib: pip install matplotlib") from None
    # Figure + Agg canvas directly: no pyplot global state, no backend switching, safe in threads.
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    labels = ["win", "tie", "loss", "unparsed"]
    counts = [s["wins"], s["ties"], s["losses"], s["unparsed"]]
    bars = ax1.bar(labels, counts, color=["#2e7d32", "#9e9e9e", "#c62828", "#f9a825"])
    for bar, c in zip(bars, counts):
        ax1.annotate(str(c), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax1.set_ylim(0, max(1, *counts) * 1.12)  # room for the count labels above the bars
    ax1.set_ylabel("prompts")
    ax1.set_title(
        f"{model} vs {base}\nwin rate {pct(s['win_rate_tie_adjusted'])} [{pct(s['ci95_low'])}, {pct(s['ci95_high'])}]",
        fontsize=10,
    )
    ml = np.array([r.model_length for r in records], dtype=float)
    bl = np.array([r.base_length for r in records], dtype=float)
    if ml.size:
        both = np.concatenate([ml, bl])
        bins = np.histogram_bin_edges(both, bins=min(30, max(5, int(np.sqrt(both.size)))))
        ax2.hist(ml, bins=bins, alpha=0.55, label=f"{model} (mean {ml.mean():.0f})", color="#1565c0")
        ax2.hist(bl, bins=bins, alpha=0.55, label=f"{base} (mean {bl.mean():.0f})", color="#ef6c00")
        ax2.axvline(ml.mean(), color="#1565c0", linestyle="--", linewidth=1)
        ax2.axvline(bl.mean(), color="#ef6c00", linestyle="--", linewidth=1)
        ax2.legend(fontsize=9)
    ax2.set_xlabel(f"output length ({s.get('length_unit', 'characters')})")
    ax2.set_ylabel("outputs")
    ax2.set_title("output lengths", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_results(
    out_dir: str | os.PathLike[str],
    records: Sequence[PairRecord],
    summary: dict[str, Any],
    model_name: str,
    base_name: str,
    judge_id: str | None = None,
    audit: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write judgments.jsonl, results.json, report.md and report.png into out_dir; return their paths.

    A `judge_audit` result goes into results.json as "judge_audit" and into the report beside the win rate.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("judgments.jsonl", "results.json", "report.md", "report.png")}
    with paths["judgments.jsonl"].open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    results = {"model": model_name, "baseline": base_name, "judge": judge_id, **summary}
    if audit is not None:
        results["judge_audit"] = dict(audit)
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = _report_md(records, summary, model_name, base_name, judge_id, audit)
    paths["report.md"].write_text(report, encoding="utf-8")
    _report_png(paths["report.png"], records, summary, model_name, base_name)
    return paths


def judge_and_report(
    items: Sequence[PairItem],
    judge: Judge,
    out_dir: str | os.PathLike[str],
    model_name: str,
    base_name: str,
    *,
    cache_path: str | os.PathLike[str] | None = None,
    retries_unparsed: int = 2,
    seed: int = 0,
    n_boot: int = 2000,
    length_fn: Callable[[str], float] = len,
    length_unit: str = "characters",
    early_stop: int = 0,
    audit: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run, summarize and write a pairwise evaluation; the cache defaults to out_dir/judge_cache.jsonl.

    `early_stop` is `run_pairwise`'s; `audit` (a `judge_audit` result) is written beside the win rate.
    """
    cache = JsonlCache(cache_path if cache_path is not None else Path(out_dir) / "judge_cache.jsonl")
    records = run_pairwise(
        items, judge, cache, retries_unparsed=retries_unparsed, length_fn=length_fn, early_stop=early_stop
    )
    summary = summarize_records(records, seed=seed, n_boot=n_boot, length_unit=length_unit)
    write_results(out_dir, records, summary, model_name, base_name, judge_id=judge.judge_id, audit=audit)
    return summary


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
        source, loader, _ = model_source(model, dtype)
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
