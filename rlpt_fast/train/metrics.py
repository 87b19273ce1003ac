"""The metrics dict of one trainer step (what metrics.jsonl, the bar and TensorBoard show).

Keys: step, epoch, lr, loss, kl, clip_ratio, grad_norm, skipped, nonfinite_streak;
reward_mean, reward_std, reward/<task>/mean, reward/<task>/std, reward/<task>/count;
groups_zero_std (fraction of groups whose rewards are all equal: no learning signal);
completion_length_mean / _min / _max, truncated_frac (finish_reason "length");
rollout_tokens_per_s (generated tokens / rollout time), train_tokens_per_s (packed tokens through
forward + backward / their time), preemptions; time_<phase> (rollout, reward, reference, train,
optimizer) and time_step in seconds; peak_memory_mb. Means over the mu updates of the step.
"""
from __future__ import annotations

import statistics

from rlpt_fast.train.loss import Rollout
from rlpt_fast.train.runtime import peak_memory_bytes

# Keys whose values depend on wall time or the machine, not on the run's numerics.
TIMING_KEYS = ("rollout_tokens_per_s", "train_tokens_per_s", "peak_memory_mb", "time_")


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def step_metrics(trainer, rollouts: list[Rollout], updates: list[dict], times: dict[str, float],
                 engine_before: dict, train_tokens: int) -> dict:
    rewards = [x for r in rollouts for x in r.rewards]
    lengths = [n for r in rollouts for n in r.lengths]
    reasons = [f for r in rollouts for f in r.finish_reasons]
    stats = trainer.engine.stats
    generated = stats.get("generated_tokens", sum(lengths)) - engine_before.get("generated_tokens", 0)
    done = [u for u in updates if not u["skipped"]] or updates
    m = {
        "step": trainer.state.step,
        "epoch": trainer.stream.position / trainer.stream.epoch_length,  # epochs of prompts consumed
        "lr": updates[0]["lr"],
        "loss": statistics.fmean(u["loss"] for u in done),
        "kl": statistics.fmean(u["kl"] for u in done),
        "clip_ratio": statistics.fmean(u["clip_ratio"] for u in done),
        "grad_norm": statistics.fmean(u["grad_norm"] for u in done),
        "skipped": any(u["skipped"] for u in updates),
        "nonfinite_streak": trainer.state.nonfinite_streak,
        "reward_mean": statistics.fmean(rewards),
        "reward_std": _std(rewards),
    }
    for task in sorted({r.row.method for r in rollouts}):
        xs = [x for r in rollouts if r.row.method == task for x in r.rewards]
        m[f"reward/{task}/mean"], m[f"reward/{task}/std"], m[f"reward/{task}/count"] = statistics.fmean(xs), _std(xs), len(xs)
    m["groups_zero_std"] = sum(max(r.rewards) == min(r.rewards) for r in rollouts) / len(rollouts)
    m.update(completion_length_mean=statistics.fmean(lengths), completion_length_min=min(lengths),
             completion_length_max=max(lengths),
             truncated_frac=sum(f == "length" for f in reasons) / len(reasons),
             preemptions=stats.get("preemptions", 0) - engine_before.get("preemptions", 0))
    m["rollout_tokens_per_s"] = generated / max(times.get("rollout", 0.0), 1e-9)
    m["train_tokens_per_s"] = train_tokens / max(times.get("train", 0.0), 1e-9)
    for phase, sec in times.items():
        m[f"time_{phase}"] = sec
    m["time_step"] = sum(times.values())
    m["peak_memory_mb"] = peak_memory_bytes(trainer.device) / 2**20
    return m


def numeric_part(metrics: dict) -> dict:
    """The metrics that a re-run with the same seeds must reproduce exactly (no timings)."""
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING_KEYS)}
