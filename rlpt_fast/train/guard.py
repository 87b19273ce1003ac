"""What keeps bad input from costing a run its work: the training rows checked before the model
loads, a prompt too long for the engine named by its row, and, when a step raises anyway, the
steps done since the last checkpoint saved before the error leaves the trainer.

`StepGuard.begin()` before each step notes what the step will change (data position, optimizer
update count, every RNG state); `StepGuard.failed()` puts them back and saves, so `--resume`
retries the failed step exactly as an uninterrupted run takes it. It saves nothing when the step
already changed weights (an optimizer update happened), under torchrun (a save is collective and
the other ranks are gone), or when nothing is new since the last checkpoint.

`StepGuard.aborted()` saves the run when it stops for train.max_nonfinite non-finite steps in a
row: such a step ran to its end (its update skipped), so the state is consistent as it stands and
`--resume` (with a lower optim.lr, say) continues after it. Alone only, as above.
"""
from __future__ import annotations

import torch

from rlpt_fast.data import MAX_LISTED, Row, load_rows
from rlpt_fast.prompt_layout import check_rows
from rlpt_fast.prompts import Prompt
from rlpt_fast.train.config import TrainConfig
from rlpt_fast.train.runtime import rng_states, set_rng_states


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss; `metrics` is the last step's, `checkpoint`
    where StepGuard.aborted saved the run (None when it did not)."""

    def __init__(self, message: str, metrics: dict):
        super().__init__(message)
        self.metrics = metrics
        self.checkpoint = None

    def add(self, text: str) -> None:
        self.args = (f"{self.args[0]}{text}",)


def training_rows(cfg: TrainConfig, rows: list[Row] | None) -> list[Row]:
    """The rows to train on (config.data.files unless given), each renderable in the layout;
    DataError naming each bad row, or a ValueError when skip_invalid left none."""
    skipped = []
    if rows is None:
        if not cfg.data.files:
            raise ValueError("data.files is empty: give RePIC-format training rows (JSON/JSONL)")
        loaded = load_rows(cfg.data.files, skip_invalid=cfg.data.skip_invalid)
        rows, skipped = loaded.rows, loaded.skipped
    sampled = {m for m, w in cfg.data.task_mix.items() if w > 0} if cfg.data.task_mix else None
    kept = check_rows(rows, cfg.data.prompt_layout, tasks=sampled, skip_invalid=cfg.data.skip_invalid)
    if not kept:  # data.skip_invalid dropped every row: say why, not "no training rows" later
        why = "".join(f"\n  {e}" for e in skipped[:MAX_LISTED])
        raise ValueError(f"no valid training rows in {cfg.data.files} ({len(skipped) + len(rows) - len(kept)} "
                         f"skipped as invalid){why}")
    return kept


def check_prompt_length(row: Row, prompt: Prompt, max_model_len: int) -> None:
    """The engine refuses a prompt that fills max_model_len naming only its request index: name the row."""
    n = prompt.input_ids.numel()
    if n >= max_model_len:
        raise ValueError(f"{row.source}: its prompt has {n} tokens, engine.max_model_len is {max_model_len}: "
                         "raise engine.max_model_len (each image costs tokens by its size)")


class StepGuard:
    """Saves the steps done when a step raises (module docstring). trainer: a Trainer."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.saved_step = trainer.state.step if trainer.resume_from is not None else None
        self._before: tuple | None = None

    def begin(self) -> None:
        t = self.trainer
        self._before = (t.stream.position, t.state.updates, rng_states())

    def saved(self, step: int) -> None:
        self.saved_step = step

    def failed(self, error: Exception, message) -> None:
        """Called with the step's exception (re-raised by the caller); message(text) tells the user."""
        t = self.trainer
        position, updates, rng = self._before
        if t.dist.distributed or t.state.updates != updates or t.state.step in (0, self.saved_step):
            return
        t.stream.position = position
        set_rng_states(rng)
        try:
            path = t.save()
        except Exception as save_error:  # never hide the step's own error behind this one
            message(f"step {t.state.step + 1} failed; saving step {t.state.step} failed too: {save_error}")
            return
        self.saved_step = t.state.step
        message(f"step {t.state.step + 1} failed ({type(error).__name__}); the {t.state.step} steps done are "
                f"saved in {path}: fix the cause and run again with --resume")

    def aborted(self, error: NonFiniteLossError) -> None:
        """Saves the run at the aborting step (module docstring); the error's message says where."""
        t = self.trainer
        if t.dist.distributed:
            return
        if not all(bool(torch.isfinite(p).all()) for p in t.params):  # such weights are not worth resuming
            error.add("; not saved: the weights hold non-finite values")
            return
        t.state.nonfinite_streak = 0  # a resumed run (lr lowered) gets max_nonfinite tries again
        try:
            path = t.save()
        except Exception as save_error:  # never hide the abort behind this one
            error.add(f"; saving step {t.state.step} failed too: {save_error}")
            return
        self.saved_step, error.checkpoint = t.state.step, path
        error.add(f"\nthe run is saved in {path} (step {t.state.step}): continue it with --resume "
                  "(e.g. --resume --optim.lr=LOWER)")
