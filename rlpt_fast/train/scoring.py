"""Rewards of one step: each completion scored by its row's method; a failure names the row."""
from __future__ import annotations

import math
from collections.abc import Callable

from rlpt_fast import rewards
from rlpt_fast.data import Row
from rlpt_fast.prompts import Prompt

# (row, completion text, prompt) -> reward in [0, 1]
RewardFn = Callable[[Row, str, Prompt], float]


class RewardError(RuntimeError):
    """A reward function raised; the message names the row, the method and the completion."""


def repic_reward(compat: str) -> RewardFn:
    """RePIC's verifiable reward for the row's accu_reward_method (rlpt_fast.rewards.score).
    The query image (last) gives the box scale of the strict IoU."""
    def fn(row: Row, text: str, prompt: Prompt) -> float:
        scale = prompt.scales[-1] if prompt.scales else None
        return rewards.score(row.method, text, row.solution, compat=compat, row=row.source, scale=scale)
    return fn


def import_reward(spec: str) -> RewardFn:
    """'package.module:function' -> the function (the config's grpo.reward_fn)."""
    from importlib import import_module

    module, _, attr = spec.partition(":")
    try:
        fn = getattr(import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"grpo.reward_fn={spec!r}: cannot import it: {e}") from None
    if not callable(fn):  # a ValueError, like every other bad config value: `rlpt train` reports it in one line
        raise ValueError(f"grpo.reward_fn={spec!r} is not callable (got {type(fn).__name__})")
    return fn


def score_group(fn: RewardFn, row: Row, texts: list[str], prompt: Prompt) -> list[float]:
    """Rewards of one prompt's completions; RewardError (chained) if `fn` raises or returns a
    non-finite value."""
    out = []
    for k, text in enumerate(texts):
        try:
            value = float(fn(row, text, prompt))
        except Exception as e:
            raise RewardError(f"reward {row.method!r} raised on row {row.source} (completion {k}: "
                              f"{text[:80]!r}): {type(e).__name__}: {e}") from e
        if not math.isfinite(value):
            raise RewardError(f"reward {row.method!r} returned {value} on row {row.source} (completion {k})")
        out.append(value)
    return out
