"""The verifier audit as a library: preference pairs, both CME forms of each text, agreement and robustness
statistics, reports (the command is `python -m cme_jax.audit`)."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import jax
import numpy as np

from cme_jax.errors import CmeError
from cme_jax.eval.rewrites import REWRITES, apply_rewrite
from cme_jax.eval.stats import LEVEL, pct, spearman, win_rate
from cme_jax.files import JsonlCache, iter_jsonl, read_records
from cme_jax.rewards import (
    RewardInputs,
    VerifierForms,
    cme_config,
    combine_host,
    text_forms,
    with_form,
)
from cme_jax.scoring import Verifier, VerifierConfig, load_verifier

Form = Literal["plain", "contrastive"]
FORMS: tuple[Form, ...] = get_args(Form)
KINDS: tuple[str, ...] = tuple(REWRITES)
KIND_LABELS = {
    "repeat_sentence": "one sentence repeated",
    "truncate": "cut mid-sentence",
    "first_sentence": "first sentence only",
    "refusal": "a refusal",
    "shuffle": "sentences shuffled",
    "other_prompt": "answer to another prompt",
    "filler": "padded with filler",
}
# Rewrite kinds that take a response to another prompt from a pool.
POOL_KINDS = frozenset({"other_prompt"})
# Texts scored per pair, in this order: the two responses of the pair, then one rewrite of chosen per kind.
ORIGINALS = ("chosen", "rejected")
COMBINED = "combined"
SHIPPED_SOURCE = "builtin:preference_pairs"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Preference pairs


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with a better (chosen) and a worse (rejected) response; `flaw` names what is wrong with it."""

    prompt: str
    chosen: str
    rejected: str
    flaw: str | None = None


def _message_text(value: Any, role: str, where: str, field: str) -> str:
    """The content of the last (assistant) or first (user) message of a chat message list."""
    picks = [m for m in value if isinstance(m, Mapping) and m.get("role") == role]
    if not picks or not isinstance(picks[-1 if role == "assistant" else 0].get("content"), str):
        raise CmeError(f"{where}: {field!r} is a message list with no {role} message holding string content")
    return picks[-1 if role == "assistant" else 0]["content"]


def pair_from_record(record: Any, where: str) -> PreferencePair:
    """A pair from `chosen`/`rejected` (strings or message lists) and `prompt` (else the user turn of chosen)."""
    if not isinstance(record, Mapping):
        raise CmeError(f"{where} must be an object with 'prompt', 'chosen' and 'rejected'")
    texts: dict[str, str] = {}
    for field in ("chosen", "rejected"):
        value = record.get(field)
        if isinstance(value, str):
            texts[field] = value
        elif isinstance(value, list):
            texts[field] = _message_text(value, "assistant", where, field)
        else:
            raise CmeError(f"{where} needs {field!r} as a string or a list of chat messages")
    prompt = record.get("prompt")
    if prompt is None and isinstance(record.get("chosen"), list):
        prompt = _message_text(record["chosen"], "user", where, "chosen")
    if not isinstance(prompt, str):
        raise CmeError(f"{where} needs a string 'prompt' (or 'chosen' as a message list holding the user turn)")
    flaw = record.get("flaw")
    return PreferencePair(prompt, texts["chosen"], texts["rejected"], flaw if isinstance(flaw, str) else None)


def _usable(pair: PreferencePair) -> bool:
    return all(t.strip() for t in (pair.prompt, pair.chosen, pair.rejected))


def _records_pairs(records: Iterable[tuple[str, dict[str, Any]]]) -> list[PreferencePair]:
    pairs = []
    for where, record in records:
        pair = pair_from_record(record, where)
        if not _usable(pair):
            raise CmeError(f"{where} has an empty prompt, chosen or rejected text; fill it in or drop the line")
        pairs.append(pair)
    return pairs


def shipped_pairs() -> list[PreferencePair]:
    """The preference pairs shipped with cme_jax: general prompts, each with a good and a flawed answer."""
    text = resources.files("cme_jax.data").joinpath("preference_pairs.jsonl").read_text(encoding="utf-8")
    return _records_pairs(iter_jsonl(text.splitlines(), SHIPPED_SOURCE))


def read_pairs_file(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL (or JSON list) file: one record each, see `pair_from_record`."""
    return _records_pairs(read_records(path, "pairs file"))


def load_hub_pairs(name: str, split: str, limit: int | None = None) -> list[PreferencePair]:
    """Pairs of a Hub dataset split (records with empty texts are skipped); one-line CmeError when unreachable."""
    import datasets
    import huggingface_hub

    hub_level = huggingface_hub.utils.logging.get_verbosity()
    ds_level = datasets.utils.logging.get_verbosity()
    # The libraries log every retry of an unreachable Hub; the failure is reported once, below.
    huggingface_hub.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # ConnectionError, FileNotFoundError, ValueError and the libraries' own types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CmeError(
            f"cannot load dataset {name!r} split {split!r} ({first}); check the name and split, or without network "
            "pass a local --pairs FILE.jsonl (or no --pairs/--dataset for the shipped pairs)"
        ) from None
    finally:
        huggingface_hub.utils.logging.set_verbosity(hub_level)
        datasets.utils.logging.set_verbosity(ds_level)
    missing = sorted({"chosen", "rejected"} - set(ds.column_names))
    if missing:
        raise CmeError(f"dataset {name!r} has no {missing[0]!r} column (it has {', '.join(ds.column_names)})")
    pairs = []
    for i, record in enumerate(ds):
        pair = pair_from_record(record, f"{name}[{split}] row {i}")
        if _usable(pair):
            pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Statistics


# ----------------------------------------------------------------------------------------------------------
# Texts and scores


def text_slots(kinds: Sequence[str] = KINDS) -> tuple[str, ...]:
    """Names of the texts scored per pair: chosen, rejected, then each rewrite kind."""
    return (*ORIGINALS, *kinds)


def make_rewrites(pairs: Sequence[PreferencePair], kinds: Sequence[str] = KINDS, seed: int = 0) -> list[dict[str, str]]:
    """Each pair's chosen response rewritten by every kind; deterministic for a seed.

    `other_prompt` draws the chosen response of a pair with another prompt.
    """
    out = []
    keys = [q.prompt.strip() for q in pairs]
    for i, p in enumerate(pairs):
        row = {}
        for kind in kinds:
            rng = random.Random(f"{seed}:{i}:{kind}")
            pool = [q.chosen for q, key in zip(pairs, keys) if key != keys[i]] if kind in POOL_KINDS else None
            try:
                row[kind] = apply_rewrite(kind, p.chosen, rng=rng, pool=pool)
            except ValueError as e:
                raise CmeError(
                    f"rewrite {kind!r} of pair {i}: {e}; give at least two pairs with different prompts"
                ) from None
        out.append(row)
    return out


def score_forms(
    verifier: Verifier,
    prompts: Sequence[str],
    texts: Sequence[str],
    *,
    stopped: Sequence[bool] | None = None,
    batch_size: int | None = 16,
    mesh: Any = None,
    progress: bool = False,
    allow_empty: bool = False,
    cache: JsonlCache | None = None,
) -> VerifierForms:
    """Both CME forms of each (prompt, text) row (`rewards.text_forms`); empty texts raise unless `allow_empty`."""
    forms = text_forms(
        verifier, prompts, texts, stopped, both=True, cache=cache, progress=progress, batch_size=batch_size, mesh=mesh
    )
    if np.asarray(forms.empty).any() and not allow_empty:
        raise CmeError(
            f"verifier {verifier.name!r}: a text has no tokens to score; drop empty responses from the pairs"
        )
    return forms


def form_scores(forms: VerifierForms, form: str) -> np.ndarray:
    """One CME form of every row as float64, 0 where there was nothing to score."""
    return np.where(np.asarray(forms.empty), 0.0, np.asarray(forms.form(form == "contrastive", ""), np.float64))


def combined_forms(
    configs: Sequence[VerifierConfig], x: RewardInputs, weights: Mapping[str, float], *, zscore: bool = False
) -> dict[str, np.ndarray]:
    """The reward `combine` gives for each CME form, with these weights (rows of a pair form one group)."""
    rcfg = cme_config([dataclasses.replace(c, weight=weights[c.name]) for c in configs], zscore=zscore)
    return {form: combine_host(with_form(rcfg, form), x).rewards.astype(np.float64) for form in FORMS}


# ----------------------------------------------------------------------------------------------------------
# The audit


def _as_weights(verifiers: Sequence[Verifier | VerifierConfig], weights: Any) -> dict[str, float]:
    names = [(v.config if isinstance(v, Verifier) else v).name for v in verifiers]
    if weights is None:
        return {n: float((v.config if isinstance(v, Verifier) else v).weight) for n, v in zip(names, verifiers)}
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights have no entry for verifier {missing[0]!r}")
        return {n: float(weights[n]) for n in names}
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} verifiers")
    return {n: float(w) for n, w in zip(names, weights)}


def summarize_scores(
    scores: Mapping[str, np.ndarray],
    lengths: np.ndarray,
    kinds: Sequence[str],
    *,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Statistics of one verifier form from its scores per slot ([n] arrays) and the texts' lengths [n, slots]."""
    slots = text_slots(kinds)
    by_slot = np.stack([scores[s] for s in slots], axis=1)
    return {
        "pairwise": win_rate(scores["chosen"], scores["rejected"], seed=seed, n_boot=n_boot),
        "rewrites": {k: win_rate(scores["chosen"], scores[k], seed=seed, n_boot=n_boot) for k in kinds},
        "length_spearman": spearman(lengths[:, :2].ravel(), by_slot[:, :2].ravel()),
        "length_spearman_all": spearman(lengths.ravel(), by_slot.ravel()),
        "mean": {s: float(scores[s].mean()) for s in slots},
    }


def warning_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per verifier, form and rewrite kind whose rewrite beats the original on more than half the pairs."""
    lines = []
    for r in results:
        for kind, w in r["rewrites"].items():
            if w["rate"] is None or w["rate"] >= 0.5:
                continue
            trained = ", the form this run trains on" if r.get("trained") else ""
            ties = f" (ties {w['ties']})" if w["ties"] else ""
            lines.append(
                f"audit: {r['verifier']} ({r['form']} CME{trained}) scores '{kind}' ({KIND_LABELS.get(kind, kind)}) "
                f"above the original answer on {w['losses']} of {w['n']} pairs{ties}: original wins "
                f"{pct(w['rate'], 0)} [95% CI {pct(w['ci95_low'], 0)}, {pct(w['ci95_high'], 0)}]"
            )
    return lines


def run_audit(
    verifiers: Sequence[Verifier | VerifierConfig],
    pairs: Sequence[PreferencePair],
    out_dir: str | Path,
    *,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    zscore: bool = False,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    n_boot: int = 2000,
    batch_size: int | None = 16,
    mesh: Any = None,
    source: str = SHIPPED_SOURCE,
    training: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every pair's texts with each verifier in both forms, write OUT's four files, return results.json.

    Verifier configs are loaded one at a time and released after scoring; loaded verifiers are used as they
    are (with `mesh`, the one their weights are sharded over). Every process scores; process 0 writes.
    `weights` (default: each config's weight) make the combined reward when there are several verifiers.
    `training` marks each verifier's configured form as the one a training run uses.
    """
    if len(pairs) < 2:
        raise CmeError(f"the audit needs at least 2 preference pairs, got {len(pairs)}")
    unknown = [k for k in kinds if k not in REWRITES]
    if unknown:
        raise CmeError(f"unknown rewrite kind {unknown[0]!r}; valid kinds: {', '.join(KINDS)}")
    if not verifiers:
        raise CmeError("no verifier given; pass --verifier SPEC or a --config file with reward.verifiers")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CmeError(f"--out {out} is a file; give a directory")
    try:
        w = _as_weights(verifiers, weights)
    except ValueError as e:
        raise CmeError(str(e)) from None
    if len(w) != len(verifiers):
        raise CmeError("two verifiers share a name; give each a distinct name")
    if COMBINED in w:
        raise CmeError(f"a verifier may not be named {COMBINED!r}, which names the weighted combination")
    progress = progress and jax.process_index() == 0

    slots = text_slots(kinds)
    S, n = len(slots), len(pairs)
    rewrites = make_rewrites(pairs, kinds, seed)
    texts_nxS = [[p.chosen, p.rejected, *(rw[k] for k in kinds)] for p, rw in zip(pairs, rewrites)]
    prompts = [p.prompt for p in pairs for _ in slots]
    texts = [t for row in texts_nxS for t in row]
    lengths_nxS = np.array([[len(t) for t in row] for row in texts_nxS], np.float64)
    _say(progress, f"audit: {n} pairs from {source}, {S} texts each ({', '.join(slots)}): {n * S} texts per verifier")

    per: dict[str, dict[str, np.ndarray]] = {}
    scored: dict[str, VerifierForms] = {}
    configs: list[VerifierConfig] = []
    chat: dict[str, bool] = {}
    for v in verifiers:
        verifier = v if isinstance(v, Verifier) else None
        if verifier is None:
            _say(progress, f"loading verifier {v.name} ({v.model})")
            verifier = load_verifier(v, mesh=mesh)
        configs.append(verifier.config)
        chat[verifier.name] = verifier.chat
        f = score_forms(verifier, prompts, texts, batch_size=batch_size, mesh=mesh, progress=progress)
        scored[verifier.name] = f
        per[verifier.name] = {form: form_scores(f, form) for form in FORMS}
        per[verifier.name].update(count=np.asarray(f.count), truncated=np.asarray(f.truncated))
        del verifier
    # Through the trainer's `combine`: non-finite scores fail as they would in training, and the combination is
    # the reward a run with these verifiers would see.
    combined = combined_forms(
        configs, RewardInputs(empty=np.zeros(len(texts), bool), verifiers=scored, group_size=S), w, zscore=zscore
    )
    if len(per) > 1:
        per[COMBINED] = combined

    flaw_of = np.array([p.flaw or "" for p in pairs])
    flaws = {f: flaw_of == f for f in sorted(set(flaw_of.tolist()) - {""})}
    results = []
    for name, forms in per.items():
        cfg = next((c for c in configs if c.name == name), None)
        for form in FORMS:
            by_slot = forms[form].reshape(n, S)
            stats = summarize_scores(
                {s: by_slot[:, j] for j, s in enumerate(slots)}, lengths_nxS, kinds, seed=seed, n_boot=n_boot
            )
            if flaws:
                stats["pairwise_by_flaw"] = {
                    f: win_rate(by_slot[mask, 0], by_slot[mask, 1], seed=seed, n_boot=n_boot)
                    for f, mask in flaws.items()
                }
            trained = training and cfg is not None and (form == "contrastive") == cfg.contrastive
            results.append({"verifier": name, "form": form, "trained": trained, **stats})
    warnings = warning_lines(results)

    items = []
    for i, (p, rw) in enumerate(zip(pairs, rewrites)):
        row: dict[str, Any] = {"index": i, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        if p.flaw is not None:
            row["flaw"] = p.flaw
        row["rewrites"] = dict(rw)
        row["length"] = dict(zip(slots, lengths_nxS[i].astype(int).tolist()))
        row["scores"] = {
            name: {form: dict(zip(slots, forms[form].reshape(n, S)[i].tolist())) for form in FORMS}
            for name, forms in per.items()
        }
        row["tokens"] = {c.name: dict(zip(slots, per[c.name]["count"].reshape(n, S)[i].tolist())) for c in configs}
        items.append(row)

    summary = {
        "pairs": {"source": source, "count": n},
        "kinds": list(kinds),
        "texts": list(slots),
        "length_unit": "characters",
        "seed": seed,
        "bootstrap_resamples": n_boot,
        "level": LEVEL,
        "verifiers": [
            {
                "name": c.name,
                "model": c.model,
                "weight": w[c.name],
                "context": c.context,
                "chat": chat[c.name],  # what the context resolved to: the chat template, or the plain template
                "template": c.template,
                "contrastive": c.contrastive,
                "max_length": c.max_length,
                "score_eos": c.score_eos,
                "truncated_texts": int(per[c.name]["truncated"].sum()),
            }
            for c in configs
        ],
        "combined": {"weights": w, "zscore": zscore} if COMBINED in per else None,
        "results": results,
        "warnings": warnings,
    }
    if jax.process_index() == 0:  # every host scores (the forward is one SPMD program); one writes
        write_outputs(out, summary, items)
    _say(progress, headline(summary))
    for line in warnings:
        _say(progress, line)
    _say(progress, f"audit report in {out / 'report.md'}")
    return summary


def start_audit(
    verifiers: Sequence[Verifier],
    weights: Sequence[float] | Mapping[str, float] | None,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    zscore: bool = False,
    seed: int = 0,
    batch_size: int | None = 16,
    mesh: Any = None,
    progress: bool = True,
) -> list[str]:
    """Audit a run's loaded verifiers on the shipped pairs (the first `limit`), write OUT, return the warnings."""
    pairs = shipped_pairs()[:limit]
    summary = run_audit(
        verifiers,
        pairs,
        out_dir,
        weights=weights,
        zscore=zscore,
        seed=seed,
        batch_size=batch_size,
        mesh=mesh,
        training=True,
        progress=progress,
    )
    return summary["warnings"]


# ----------------------------------------------------------------------------------------------------------
# Files


def _rate_cell(w: Mapping[str, Any]) -> str:
    if w["rate"] is None:
        return "n/a"
    return f"{pct(w['rate'], 0)} [{pct(w['ci95_low'], 0)}, {pct(w['ci95_high'], 0)}]"


def _rho(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _label(r: Mapping[str, Any]) -> str:
    return f"{r['verifier']} {r['form']}"


def headline(summary: Mapping[str, Any]) -> str:
    """One line per verifier form: pairwise accuracy and the weakest rewrite kind."""
    lines = []
    for r in summary["results"]:
        worst = min(r["rewrites"].items(), key=lambda kv: kv[1]["rate"], default=None)
        tail = f"; weakest vs rewrites: {worst[0]} {pct(worst[1]['rate'], 0)}" if worst else ""
        lines.append(f"  {_label(r):<32} pairwise accuracy {_rate_cell(r['pairwise'])}{tail}")
    return "\n".join(["audit results (original wins, 95% bootstrap CI):", *lines])


def report_md(summary: Mapping[str, Any]) -> str:
    """The markdown report: accuracy table, rewrite table, warnings, how to read it."""
    kinds = summary["kinds"]
    n = summary["pairs"]["count"]
    lines = [
        "# Verifier audit",
        "",
        f"{n} preference pairs from `{summary['pairs']['source']}`. Each verifier scores the chosen and the rejected "
        f"response and {len(kinds)} degenerate rewrites of the chosen one, as **plain CME** (mean log-prob per "
        "response token after the verifier's context) and as **contrastive CME** (the same minus the response's "
        "mean log-prob after an empty prompt: what the prompt adds, per token).",
        "",
        "| verifier | form | pairwise accuracy [95% CI] | worst rewrite: original wins | ρ(CME, length) |",
        "|---|---|---|---|---|",
    ]
    for r in summary["results"]:
        worst = min(r["rewrites"].items(), key=lambda kv: kv[1]["rate"], default=None)
        worst_cell = f"{KIND_LABELS.get(worst[0], worst[0])}: {pct(worst[1]['rate'], 0)}" if worst else "n/a"
        form = f"**{r['form']}** (trained)" if r.get("trained") else r["form"]
        lines.append(
            f"| {r['verifier']} | {form} | {_rate_cell(r['pairwise'])} | {worst_cell} | {_rho(r['length_spearman'])} |"
        )
    lines += [
        "",
        "## Original beats its rewrite",
        "",
        "Share of pairs where the chosen response scores above its rewrite (95% CI). Below 50% the reward "
        "prefers the degenerate text: a policy trained on it can learn to produce that.",
        "",
        "| verifier | form | " + " | ".join(KIND_LABELS.get(k, k) for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for r in summary["results"]:
        cells = []
        for k in kinds:
            cell = _rate_cell(r["rewrites"][k])
            cells.append(f"**{cell}**" if r["rewrites"][k]["rate"] < 0.5 else cell)
        lines.append(f"| {r['verifier']} | {r['form']} | " + " | ".join(cells) + " |")
    lines.append("")
    flaws = list(summary["results"][0].get("pairwise_by_flaw", {}))
    if flaws:
        counts = summary["results"][0]["pairwise_by_flaw"]
        lines += [
            "## Pairwise accuracy by what is wrong with the rejected answer",
            "",
            "| verifier | form | " + " | ".join(f"{f.replace('_', ' ')} (n={counts[f]['n']})" for f in flaws) + " |",
            "|---|---|" + "---|" * len(flaws),
        ]
        for r in summary["results"]:
            cells = [pct(r["pairwise_by_flaw"][f]["rate"], 0) for f in flaws]
            lines.append(f"| {r['verifier']} | {r['form']} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["warnings"]:
        lines += ["## Warnings", "", *(f"- {w.removeprefix('audit: ')}" for w in summary["warnings"]), ""]
    else:
        lines += ["No verifier form prefers any rewrite kind to the original on more than half the pairs.", ""]
    lines += ["![accuracy with 95% intervals, and CME against response length](report.png)", ""]
    cut = [v for v in summary["verifiers"] if v["truncated_texts"]]
    for v in cut:
        lines += [
            f"Note: {v['truncated_texts']} texts exceed {v['name']}'s max_length of {v['max_length']} tokens and are "
            "scored on their start, as in training; rewrites that change only the end (filler) look unchanged there.",
            "",
        ]
    combined = summary.get("combined")
    if combined:
        parts = ", ".join(f"{w:g} x {name}" for name, w in combined["weights"].items())
        z = " after z-scoring each verifier over a pair's texts" if combined["zscore"] else ""
        lines += [f"`{COMBINED}` is {parts}{z}.", ""]
    lines += [
        "How to read: pairwise accuracy near 50% means the verifier cannot tell the better answer; ρ(CME, length) "
        "is the Spearman correlation with length in characters over chosen and rejected responses (far from 0: "
        "the reward also pays for length). Intervals are percentile bootstraps over pairs "
        f"({summary['bootstrap_resamples']} resamples); ties count half. Texts and scores per pair are in "
        "items.jsonl, all numbers in results.json.",
        "",
    ]
    return "\n".join(lines)


def report_png(path: Path, summary: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> None:
    """Accuracy bars with 95% intervals per verifier form, and CME against length per verifier form."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CmeError("report.png needs matplotlib: pip install matplotlib") from None
    results = summary["results"]
    kinds = summary["kinds"]
    panels = results[:8]  # beyond eight verifier forms the scatter row would be unreadable; the bars show all
    cols = max(2, len(panels))
    # Figure + Agg canvas directly: no pyplot global state, no backend switching, safe in threads.
    fig = Figure(figsize=(max(11.0, 2.9 * cols), 7.6), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, cols, height_ratios=[1.15, 1])
    ax = fig.add_subplot(grid[0, :])
    groups = ["chosen vs\nrejected", *(KIND_LABELS.get(k, k).replace(" ", "\n") for k in kinds)]
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(results))
    for j, r in enumerate(results):
        stats = [r["pairwise"], *(r["rewrites"][k] for k in kinds)]
        rate = np.array([s["rate"] for s in stats], float)
        low = np.array([s["ci95_low"] for s in stats], float)
        high = np.array([s["ci95_high"] for s in stats], float)
        color = _color(j)
        ax.bar(
            x - 0.4 + width * (j + 0.5),
            rate,
            width,
            yerr=[rate - low, high - rate],
            capsize=2,
            label=_label(r),
            color=color,
            hatch="//" if r["form"] == "contrastive" else None,
            edgecolor="white",
            linewidth=0.5,
        )
        # A tick at each rate keeps bars of height 0 visible.
        ax.scatter(x - 0.4 + width * (j + 0.5), rate, marker="_", s=40, color="black", linewidths=1, zorder=3)
    ax.axhline(0.5, color="#555555", linestyle="--", linewidth=1)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("original wins (pairwise: chosen wins)")
    ax.set_title(
        f"Verifier audit on {summary['pairs']['count']} pairs: share where the better text scores higher (95% CI)",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    slots = summary["texts"]
    for j, r in enumerate(panels):
        a = fig.add_subplot(grid[1, j])
        for slot, color, size, label in (
            ("rewrites", "#9e9e9e", 6, "rewrites"),
            ("rejected", "#c62828", 12, "rejected"),
            ("chosen", "#2e7d32", 12, "chosen"),
        ):
            keys = [s for s in slots if s not in ORIGINALS] if slot == "rewrites" else [slot]
            xs = [it["length"][k] for it in items for k in keys]
            ys = [it["scores"][r["verifier"]][r["form"]][k] for it in items for k in keys]
            a.scatter(xs, ys, s=size, c=color, alpha=0.7, label=label, linewidths=0)
        a.set_xscale("log")
        a.set_title(
            f"{_label(r)}\nρ(len) {_rho(r['length_spearman'])} (all {_rho(r['length_spearman_all'])})", fontsize=8
        )
        a.set_xlabel("length (characters)", fontsize=8)
        a.tick_params(labelsize=7)
        if j == 0:
            a.set_ylabel("CME", fontsize=8)
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _color(j: int) -> str:
    palette = ["#1565c0", "#64b5f6", "#ef6c00", "#ffb74d", "#6a1b9a", "#ba68c8", "#2e7d32", "#81c784"]
    return palette[j % len(palette)]


def write_outputs(out: Path, summary: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """Write items.jsonl, results.json, report.md and report.png into out; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("items.jsonl", "results.json", "report.md", "report.png")}
    with paths["items.jsonl"].open("w", encoding="utf-8") as f:
        for row in items:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths["results.json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["report.md"].write_text(report_md(summary), encoding="utf-8")
    report_png(paths["report.png"], summary, items)
    return paths
