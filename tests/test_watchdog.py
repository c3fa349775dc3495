"""The reward-hacking watchdog: hand-computed signals on synthetic traces, resume, the length-Spearman metric,
and real trainer runs whose reward is the response length."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

from cme_jax import train as train_mod
from cme_jax.checkpoint import CheckpointManager
from cme_jax.config import TrainConfig, load_config
from cme_jax.errors import CmeError
from cme_jax.train_step import UpdateBatch, rollout_metrics
from cme_jax.watchdog import WatchConfig, read_metrics, replay, verdict
from tests.train_helpers import metric_rows, tiny_config, write_config

# ---------------------------------------------------------------------------------------------------------
# Synthetic traces

# A policy learning to game length, W = 3: the reward climbs, distinct-2 falls, the within-group reward/length
# rank correlation rises, more responses hit the limit; repetition, empty responses and length stay benign.
HACKING = {
    "reward/mean": [1, 1, 1, 2, 2, 2, 3, 3, 3],
    "response/distinct_2": [0.9, 0.9, 0.9, 0.88, 0.86, 0.84, 0.8, 0.8, 0.8],
    "response/repetition_4": [0.01] * 9,
    "reward/length_spearman": [0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 0.9, 0.9, 0.9],
    "response/truncated_frac": [0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.3, 0.4, 0.5],
    "response/empty_frac": [0.0] * 9,
    "response/length_mean": [20, 20, 20, 22, 24, 26, 28, 30, 32],
}


def trace(columns: dict[str, list[float]]) -> list[dict]:
    n = len(next(iter(columns.values())))
    return [{"step": i + 1, **{k: float(v[i]) for k, v in columns.items()}} for i in range(n)]


def test_length_hacking_trace_fires_the_expected_signals_with_hand_computed_values():
    cfg = WatchConfig(window=3)
    scalars, events = replay(trace(HACKING), cfg)
    # length_corr = mean spearman over the last 3 steps: step 5 (0.3+0.4+0.6)/3 = 0.433 < 0.5, step 6
    # (0.4+0.6+0.8)/3 = 0.6. distinct2_drop at step 6: 0.9 - (0.88+0.86+0.84)/3 = 0.04 < 0.05; step 7:
    # 0.9 - (0.86+0.84+0.8)/3 = 0.0667, the reward having risen from 1 to (2+2+3)/3. truncation_rise: step 7
    # (0.1+0.1+0.3)/3 = 0.167 < 0.2, step 8 (0.1+0.3+0.4)/3 - 0 = 0.267.
    got = [(e.step, e.signal, e.value, e.threshold) for e in events]
    assert got == [
        (6, "length_corr", pytest.approx(0.6), 0.5),
        (7, "distinct2_drop", pytest.approx(0.9 - 2.5 / 3), 0.05),
        (8, "truncation_rise", pytest.approx(0.8 / 3), 0.2),
    ]
    assert events[0].message == (
        "watchdog: length_corr=0.6 >= 0.5 at step 6 (mean within-group rank correlation of reward and response "
        "length over steps 4-6): the policy may be exploiting length"
    )
    assert "distinct-2 0.9 over steps 1-3 -> 0.833 over steps 5-7" in events[1].message
    # Only what is computable is reported: nothing before W steps, the trailing signals from W, trends from
    # 2W, and kl_growth never (no kl_mean in the trace).
    assert [s["step"] for s in scalars] == list(range(1, 10))
    assert set(scalars[1]) == {"step"}
    assert set(scalars[2]) == {"step", "watch/length_corr", "watch/empty_frac"}
    assert set(scalars[5]) == {
        "step",
        "watch/distinct2_drop",
        "watch/repetition_rise",
        "watch/length_corr",
        "watch/truncation_rise",
        "watch/empty_frac",
        "watch/length_shrink",
    }
    assert scalars[5]["watch/distinct2_drop"] == pytest.approx(0.04)
    assert scalars[5]["watch/repetition_rise"] == pytest.approx(0.0)
    assert scalars[5]["watch/length_shrink"] == pytest.approx(1 - 24 / 20)  # growing: negative
    assert verdict(events, 9) == (
        "watchdog: fired length_corr at step 6, distinct2_drop at step 7, truncation_rise at step 8 in 9 steps "
        "(see watchdog.jsonl)"
    )


def test_distinct2_drop_counts_only_while_the_reward_rises():
    falling_reward = {**HACKING, "reward/mean": [3, 3, 3, 2, 2, 2, 1, 1, 1]}
    scalars, events = replay(trace(falling_reward), WatchConfig(window=3))
    assert "distinct2_drop" not in {e.signal for e in events}
    assert all(s.get("watch/distinct2_drop", 0.0) == 0.0 for s in scalars)


def test_a_signal_fires_again_only_after_going_back_below():
    rows = trace({"response/empty_frac": [0.0, 0.2, 0.3, 0.0, 0.5, 0.5]})
    _, events = replay(rows, WatchConfig(window=1))
    assert [(e.step, e.signal, e.value) for e in events] == [(2, "empty_frac", 0.2), (5, "empty_frac", 0.5)]


def test_kl_growth_needs_the_ratio_and_the_floor():
    cfg = WatchConfig(window=2)
    # Step 4 (steps 3-4 over 1-2): 0.004/0.001 = 4, but the recent mean 0.004 is below the floor. Step 5 (4-5
    # over 2-3): 0.027/0.0025 = 10.8 with 0.027 above the floor -> fires; it stays up through step 7 (2.04)
    # and is back below at step 8 (0.06/0.05 = 1.2).
    kl = [0.001, 0.001, 0.004, 0.004, 0.05, 0.05, 0.06, 0.06]
    scalars, events = replay(trace({"kl_mean": kl}), cfg)
    assert [s.get("watch/kl_growth") for s in scalars] == [
        None,
        None,
        None,
        pytest.approx(4.0),
        pytest.approx(0.027 / 0.0025),
        pytest.approx(12.5),
        pytest.approx(0.055 / 0.027),
        pytest.approx(1.2),
    ]
    assert [(e.step, e.signal) for e in events] == [(5, "kl_growth")]
    assert "floor 0.02" in events[0].message


def test_flat_noisy_trace_stays_silent():
    rng = np.random.default_rng(0)
    n = 60
    noisy = {
        "reward/mean": -2.0 + 0.05 * rng.standard_normal(n),
        "response/distinct_2": 0.9 + 0.01 * rng.standard_normal(n),
        "response/repetition_4": 0.02 + 0.005 * rng.standard_normal(n),
        "reward/length_spearman": 0.1 * rng.standard_normal(n),
        "response/truncated_frac": 0.1 + 0.02 * rng.standard_normal(n),
        "response/empty_frac": 0.02 * rng.random(n),
        "response/length_mean": 40 + rng.standard_normal(n),
        "kl_mean": 0.05 + 0.005 * rng.standard_normal(n),
    }
    scalars, events = replay(trace({k: list(v) for k, v in noisy.items()}), WatchConfig())
    assert events == []
    assert set(scalars[18]) == {"step", "watch/length_corr", "watch/empty_frac"}
    assert len(scalars[19]) == 1 + 7  # from 2W = 20 steps every signal is reported (kl_growth too)
    assert verdict(events, n) == "watchdog: no signal fired in 60 steps"


def test_resume_from_metrics_jsonl_equals_one_uninterrupted_replay(tmp_path):
    """Steps 1-7 logged, killed, resumed from the checkpoint at step 5: steps 6-7 are re-run and logged again."""
    cfg = WatchConfig(window=3)
    rows = trace(HACKING)
    whole_scalars, whole_events = replay(rows, cfg)
    stale = [{**r, "reward/length_spearman": -1.0, "response/truncated_frac": 1.0} for r in rows[5:7]]
    logged = rows[:5] + stale + rows[5:]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged) + '{"step": 10, "rew')
    assert replay(read_metrics(tmp_path), cfg) == (whole_scalars, whole_events)
    # The trainer's own resume path: history up to the checkpoint from the file, then the re-run steps live.
    train_cfg = TrainConfig(run_dir=str(tmp_path), watch=cfg)
    (tmp_path / "watchdog.jsonl").write_text("a row of the killed session\n")
    dog, events = train_mod.start_watchdog(train_cfg, 5)
    assert events == [] and len(dog.rows) == 5
    assert (tmp_path / "watchdog.jsonl").read_text() == ""
    live = [dog.observe(r["step"], r) for r in rows[5:]]
    assert [{"step": r["step"], **s} for r, (s, _) in zip(rows[5:], live)] == whole_scalars[5:]
    assert [e for _, evs in live for e in evs] == whole_events
    # Split after the first event: the replayed events come back, and watchdog.jsonl holds them again.
    dog, events = train_mod.start_watchdog(train_cfg, 6)
    assert events == whole_events[:1]
    assert [json.loads(x) for x in (tmp_path / "watchdog.jsonl").read_text().splitlines()] == [
        dataclasses.asdict(whole_events[0])
    ]


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["watch.window=0"], "watch.window=0"),
        (["watch.length_corr=1.5"], "watch.length_corr"),
        (["watch.kl_growth=0.5"], "watch.kl_growth"),
        (["watch.kl_floor=-1"], "watch.kl_floor"),
        (["watch.windwo=3"], "window"),
        (["watch.enabled=maybe"], "watch.enabled"),
        (["train.stop_on_hacking=true", "checkpoint.keep=1"], "checkpoint.keep >= 2"),
        (["train.stop_on_hacking=true", "watch.enabled=false"], "watch.enabled"),
    ],
)
def test_watch_config_errors_are_one_line(overrides, words):
    with pytest.raises(CmeError) as exc:
        load_config(None, overrides)
    assert "\n" not in str(exc.value) and words in str(exc.value), str(exc.value)


def test_watch_config_defaults():
    cfg = load_config(None, ["train.stop_on_hacking=true", "checkpoint.keep=2"])
    assert cfg.train.stop_on_hacking and cfg.watch == WatchConfig()
    assert (cfg.watch.window, cfg.watch.length_corr, cfg.watch.kl_floor) == (10, 0.5, 0.02)
    assert not TrainConfig().train.stop_on_hacking


# ---------------------------------------------------------------------------------------------------------
# reward/length_spearman


def test_length_spearman_matches_scipy_with_ties_and_constant_groups():
    G = 4
    rewards = np.array([1, 2, 2, 5, 3, 3, 3, 3, 0.5, 0.1, 0.2, 0.9, 4, 1, 4, 1, 0.3, 0.1, 0.2, 0.4], np.float32)
    lengths = np.array([3, 4, 7, 7, 1, 2, 3, 4, 8, 8, 8, 8, 2, 5, 5, 9, 9, 1, 4, 6], np.int32)
    R = len(rewards)
    batch = UpdateBatch(
        tokens=jnp.zeros((R, 2), jnp.int32),
        mask=jnp.ones((R, 2), bool),
        response_mask=jnp.ones((R, 1), bool),
        sampler_logp=jnp.zeros((R, 1)),
        truncated=jnp.zeros((R,), bool),
        lengths=jnp.asarray(lengths),
    )
    metrics = jax.jit(lambda b, r: rollout_metrics(b, r, r, G))(batch, jnp.asarray(rewards))
    # Groups 1 (constant rewards) and 2 (constant lengths) are left out.
    kept = [0, 3, 4]
    expected = np.mean([spearmanr(rewards[g * G : (g + 1) * G], lengths[g * G : (g + 1) * G])[0] for g in kept])
    assert float(metrics["reward/length_spearman"]) == pytest.approx(expected, abs=1e-6)
    # By hand, the Pearson correlation of the average ranks: group 0 ranks (1, 2.5, 2.5, 4) against (1, 2, 3.5, 3.5)
    # give 3.75 / 4.5; group 3 (3.5, 1.5, 3.5, 1.5) against (1, 2.5, 2.5, 4) give -1/sqrt(2); group 4 gives 0.8.
    assert expected == pytest.approx((3.75 / 4.5 - 1 / np.sqrt(2) + 0.8) / 3)
    no_group = dataclasses.replace(batch, lengths=jnp.full((R,), 3, jnp.int32))
    r = jnp.asarray(rewards)
    assert float(rollout_metrics(no_group, r, r, G)["reward/length_spearman"]) == 0


# ---------------------------------------------------------------------------------------------------------
# Real runs: a tiny random policy rewarded for length


def length_run_config(tiny_models, prompts_file, run_dir, **sections) -> TrainConfig:
    """Length as the whole reward, many single-token stops so response lengths vary within a group, W = 2.

    Fused, with one prompt length, so both runs share one compiled step.
    """
    base = dict(
        train={"steps": 8, "fused": True, "prompt_padding": "max"},
        model={"stop_strings": list("abcdefghijklmnopqrstuvwxyz")},
        reward={"terms": [{"name": "length"}], "verifiers": []},
        sampling={"num_samples": 4, "max_new_tokens": 8},
        grpo={"beta": 0.0},
        watch={"window": 2},
        logging={"samples_every": 0, "tensorboard": False, "console": False},
    )
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    raw = tiny_config(tiny_models, prompts_file, run_dir, **base)
    return load_config(write_config(run_dir.parent / f"{run_dir.name}.yaml", raw))


def test_length_reward_run_fires_length_corr_and_resume_keeps_the_signals(tiny_models, prompts_file, tmp_path, capsys):
    cfg = length_run_config(tiny_models, prompts_file, tmp_path / "run")
    assert train_mod.train(cfg, stop_after=3).step == 3
    assert train_mod.train(cfg).step == 8
    err = capsys.readouterr().err
    rows = metric_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 9))
    scalars, events = replay(rows, cfg.watch)
    # What the trainer logged live, across the interruption, is what one replay of the whole trace gives.
    assert [{k: v for k, v in r.items() if k.startswith("watch/")} for r in rows] == [
        {k: v for k, v in s.items() if k != "step"} for s in scalars
    ]
    logged = [json.loads(line) for line in (tmp_path / "run" / "watchdog.jsonl").read_text().splitlines()]
    assert logged == [dataclasses.asdict(e) for e in events]
    corr = [e for e in events if e.signal == "length_corr"]
    assert corr, err
    step = corr[0].step
    spearman = [r["reward/length_spearman"] for r in rows]
    assert corr[0].value == pytest.approx(np.mean(spearman[step - 2 : step]))
    assert all(np.mean(spearman[s - 2 : s]) < 0.5 for s in range(2, step))
    assert f"warning: {corr[0].message}" in err.splitlines()
    assert verdict(events, 8) in err.splitlines()


def test_stop_on_hacking_ends_the_run_and_keeps_the_checkpoint_before(tiny_models, prompts_file, tmp_path, capsys):
    cfg = length_run_config(
        tiny_models,
        prompts_file,
        tmp_path / "run",
        train={"stop_on_hacking": True},
        checkpoint={"every": 1, "keep": 2},
    )
    result = train_mod.train(cfg)
    err = capsys.readouterr().err
    logged = [json.loads(line) for line in (tmp_path / "run" / "watchdog.jsonl").read_text().splitlines()]
    step = logged[0]["step"]
    assert "length_corr" in [e["signal"] for e in logged] and {e["step"] for e in logged} == {step}, err
    assert result.step == step and step >= 2
    assert [r["step"] for r in metric_rows(tmp_path / "run")] == list(range(1, step + 1))
    with CheckpointManager(tmp_path / "run", read_only=True) as ckpt:
        assert ckpt.all_steps() == [step - 1, step]
    assert all(f"warning: {e['message']}" in err for e in logged)
    assert f"the last good checkpoint, saved before the warning, is step {step - 1}" in err
