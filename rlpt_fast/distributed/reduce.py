"""Per-step metrics reduced across ranks so rank 0 logs what one process on the whole batch would.

Each key is reduced by the first rule whose pattern (fnmatch) it matches:
    mean  weighted by a count (e.g. reward_mean by the number of completions on each rank), so the
          result is the mean over the union of the ranks' samples;
    std   pooled exactly from each rank's (count, mean, std): statistics.stdev over the union;
    sum   totals (counts, preemptions, aggregate tokens/s);
    max / min   peaks and extremes (peak memory, the slowest phase, longest completion);
    same  values every rank holds identically by construction (step, lr, the global grad norm).
Weights name a key of the metrics or of `counts`; "{stem}" stands for the key without its last
"/part" (reward/<task>/mean is weighted by reward/<task>/count). A key some rank lacks (a task
that rank did not see this step) counts with weight 0 there. Two collectives per call: one
all-reduce of sums, one of maxima (float64, on the CPU), after one all-gather of the key names.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlpt_fast.distributed.context import DistContext


@dataclass(frozen=True)
class Rule:
    how: str                  # mean | std | sum | max | min | same
    weight: str | None = None  # mean/std: the count that weights a rank's value (None: 1 per rank)
    mean: str | None = None    # std: the key of the matching mean

    def __post_init__(self):
        if self.how not in ("mean", "std", "sum", "max", "min", "same"):
            raise ValueError(f"Rule.how must be mean|std|sum|max|min|same, got {self.how!r}")
        if self.how == "std" and (self.weight is None or self.mean is None):
            raise ValueError("Rule('std') needs weight= (the count) and mean= (the mean's key)")


# The trainer's keys (rlpt_fast/train/metrics.py); counts: completions and groups on the rank.
DEFAULT_RULES: tuple[tuple[str, Rule], ...] = (
    ("step", Rule("same")), ("epoch", Rule("same")), ("lr", Rule("same")), ("grad_norm", Rule("same")),
    ("nonfinite_streak", Rule("same")), ("skipped", Rule("max")),
    # loss: each rank reports its loss scaled as its gradient is (DataParallel.loss_factor), so
    # the plain mean over ranks is the one-process loss for every loss_type
    ("loss", Rule("mean")), ("kl", Rule("mean", "completions")),
    ("clip_ratio", Rule("mean", "completions")),
    ("reward_mean", Rule("mean", "completions")), ("reward_std", Rule("std", "completions", "reward_mean")),
    ("reward/*/mean", Rule("mean", "{stem}/count")), ("reward/*/std", Rule("std", "{stem}/count", "{stem}/mean")),
    ("reward/*/count", Rule("sum")),
    ("groups_zero_std", Rule("mean", "groups")),
    ("completion_length_mean", Rule("mean", "completions")), ("truncated_frac", Rule("mean", "completions")),
    ("completion_length_min", Rule("min")), ("completion_length_max", Rule("max")),
    ("preemptions", Rule("sum")), ("*_tokens_per_s", Rule("sum")),
    ("time_*", Rule("max")), ("peak_memory_mb", Rule("max")),
    ("*", Rule("mean")),
)


def rule_for(key: str, rules=DEFAULT_RULES) -> Rule:
    for pattern, rule in rules:
        if fnmatch.fnmatchcase(key, pattern):
            return rule
    raise KeyError(f"no reduction rule matches metric {key!r}")


def _kind(value) -> str:
    return "b" if isinstance(value, bool) else "i" if isinstance(value, int) else "f"


def _all_keys(kinds: dict[str, str]) -> dict[str, str]:
    """Union of every rank's {key: "b"|"i"|"f"} (JSON through uint8 tensors: no pickle on the
    wire), so a key some rank lacks keeps its type; a float on any rank makes it a float."""
    data = torch.tensor(list(json.dumps(kinds).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(parts, padded)
    union: dict[str, str] = {}
    for part, size in zip(parts, sizes):
        for key, kind in json.loads(bytes(part[:int(size.item())].tolist())).items():
            union[key] = kind if union.get(key, kind) == kind else "f"
    return dict(sorted(union.items()))


def _lookup(name: str, key: str, metrics: dict, counts: dict) -> float:
    name = name.replace("{stem}", key.rsplit("/", 1)[0])
    if name in counts:
        return float(counts[name])
    if name in metrics:
        return float(metrics[name])
    raise KeyError(f"metric {key!r} is weighted by {name!r}, which is neither a metric nor a count")


def _encode(key: str, rule: Rule, metrics: dict, counts: dict) -> tuple[list[float], list[float]]:
    """(entries to sum, entries to max) this rank contributes for one key."""
    here = key in metrics
    v = float(metrics[key]) if here else 0.0
    if rule.how in ("mean", "std"):
        w = (_lookup(rule.weight, key, metrics, counts) if rule.weight else 1.0) if here else 0.0
        if rule.how == "mean":
            return [v * w, w], []
        m = _lookup(rule.mean, key, metrics, counts) if here else 0.0
        return [w, w * m, (w - 1) * v * v + w * m * m if w else 0.0], []
    if rule.how == "sum":
        return [v], []
    neg = -math.inf
    return [], [(-v if rule.how == "min" else v) if here else neg]


def _decode(rule: Rule, s: list[float], m: list[float]) -> float:
    if rule.how == "mean":
        return s[0] / s[1] if s[1] else math.nan
    if rule.how == "std":
        n, total, sq = s
        if n <= 1:
            return 0.0
        return math.sqrt(max(0.0, (sq - total * total / n) / (n - 1)))
    if rule.how == "sum":
        return s[0]
    return -m[0] if rule.how == "min" else m[0]


def reduce_metrics(ctx: DistContext, metrics: dict, counts: dict | None = None, rules=DEFAULT_RULES) -> dict:
    """The metrics over all ranks (every rank gets the result). counts: extra weights of this rank,
    e.g. {"completions": 16, "groups": 2}. bool and int values keep their type (an int mean
    that is not whole becomes a float). Alone: a copy."""
    if not ctx.distributed:
        return dict(metrics)
    counts = counts or {}
    kinds = _all_keys({k: _kind(v) for k, v in metrics.items()})
    plan, sums, maxes = [], [], []
    for key in kinds:
        rule = rule_for(key, rules)
        s, m = _encode(key, rule, metrics, counts)
        plan.append((key, rule, len(sums), len(s), len(maxes), len(m)))
        sums += s
        maxes += m
    s_t = torch.tensor(sums + [0.0], dtype=torch.float64)
    m_t = torch.tensor(maxes + [0.0], dtype=torch.float64)
    dist.all_reduce(s_t, op=dist.ReduceOp.SUM)
    dist.all_reduce(m_t, op=dist.ReduceOp.MAX)
    s_l, m_l = s_t.tolist(), m_t.tolist()
    out = {}
    for key, rule, si, sn, mi, mn in plan:
        value = _decode(rule, s_l[si:si + sn], m_l[mi:mi + mn])
        if kinds[key] == "b":
            value = bool(value)
        elif kinds[key] == "i" and float(value).is_integer():
            value = int(value)
        out[key] = value
    return out


def all_true(ctx: DistContext, flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank (decisions that must agree, such as
    skipping a non-finite step: a rank that skips a backward the others run would hang them)."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sum_across(ctx: DistContext, value: float) -> float:
    """Sum of a Python number over ranks (e.g. the global count of completion tokens)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()
