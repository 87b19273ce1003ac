"""The order in which training rows become prompts: deterministic by (seed, epoch), resumable.

The stream is an endless sequence of (epoch, row index) pairs; `position` counts the prompts
taken so far and is the whole state a checkpoint needs. Epoch e is a permutation of the rows
drawn from `random.Random(f"{seed}:{e}")` (identity when shuffle is off). With a task mix, an
epoch is instead len(rows) draws: a task by weight, then the next row of that task from its own
shuffled cycle, so a task with few rows is repeated and a task of weight 0 is never seen.
"""
from __future__ import annotations

import random

from rlpt_fast.data import Row


class PromptStream:
    def __init__(self, rows: list[Row], seed: int, *, shuffle: bool = True,
                 task_mix: dict[str, float] | None = None):
        if not rows:
            raise ValueError("PromptStream: no training rows")
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.task_mix = {m: w for m, w in (task_mix or {}).items() if w > 0}
        self.by_task: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            self.by_task.setdefault(r.method, []).append(i)
        missing = [m for m in self.task_mix if m not in self.by_task]
        if missing:
            raise ValueError(f"data.task_mix gives weight to task(s) {missing} that no training row has "
                             f"(rows have: {sorted(self.by_task)})")
        self.position = 0
        self._orders: dict[int, list[int]] = {}

    @property
    def epoch_length(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> list[int]:
        """Row indices of one epoch (cached; only the current epochs are kept)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = self._mixed(epoch) if self.task_mix else self._permutation(epoch)
        return self._orders[epoch]

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _mixed(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.seed}:mix:{epoch}")
        tasks = sorted(self.task_mix)
        weights = [self.task_mix[t] for t in tasks]
        cycles = {t: [] for t in tasks}
        out = []
        for _ in range(len(self.rows)):
            t = rng.choices(tasks, weights)[0]
            if not cycles[t]:
                cycles[t] = list(self.by_task[t])
                if self.shuffle:
                    rng.shuffle(cycles[t])
            out.append(cycles[t].pop())
        return out

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next n (epoch, row index) pairs."""
        out = []
        for _ in range(n):
            epoch, k = divmod(self.position, self.epoch_length)
            out.append((epoch, self.order(epoch)[k]))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"position", "rows", "seed"} <= set(state):
            raise ValueError(f"the stream state needs position, rows and seed, got {state!r}")
        if state["rows"] != len(self.rows):
            raise ValueError(f"checkpoint was taken over {state['rows']} training rows, the data now has "
                             f"{len(self.rows)}: resuming would not continue the same run")
        if state["seed"] != self.seed:  # the order of the prompts (and every rollout seed) would change
            raise ValueError(f"checkpoint was taken with train.seed={state['seed']}, the config now has "
                             f"{self.seed}: resuming would not continue the same run")
        self.position = int(state["position"])
