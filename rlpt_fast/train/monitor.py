"""What a user sees of a run: a progress bar with ETA, metrics.jsonl, TensorBoard, PNG curves.

metrics.jsonl holds one JSON object per trainer step (the dict Trainer.step returns), strict JSON:
a non-finite value (the loss of a skipped step) is written as null, which jq and other readers
take, where Python's NaN token is not JSON. On resume
the lines past the checkpoint's step are dropped, so the file reads as one uninterrupted run.
TensorBoard (if the `tensorboard` package is installed) gets every numeric metric; matplotlib (if
installed) draws the curves into `plots/` when the run ends.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# Metrics drawn at the end: (file stem, title, metric-name prefixes)
PLOTS = (("reward", "reward (mean per task)", ("reward_mean", "reward/")),
         ("kl", "KL to the reference", ("kl",)),
         ("completion_length", "completion length (tokens)", ("completion_length_mean",)),
         ("clip_ratio", "clip ratio", ("clip_ratio",)),
         ("loss", "loss", ("loss",)),
         ("throughput", "tokens/s", ("rollout_tokens_per_s", "train_tokens_per_s")))


class Monitor:
    def __init__(self, output_dir: str | Path, total_steps: int, *, progress: bool = True,
                 tensorboard: bool = True, plots: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.total, self.want_plots = total_steps, plots
        self.bar = self.writer = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, desc="grpo", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl and plots still are
                self.writer = None

    def resume_at(self, step: int) -> None:
        """Drop logged steps after `step` (they will be re-run) and move the bar there."""
        if self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
            # a new file renamed over the old: a crash here never truncates the steps already logged
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(_nulls_for_nonfinite(metrics), allow_nan=False) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(k, v, metrics["step"])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                                 len=f"{metrics['completion_length_mean']:.0f}",
                                 skipped=int(metrics["skipped"]), refresh=False)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> list[Path]:
        """Closes the bar and writer; draws the plots. Returns the PNG paths written."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        return plot_metrics(self.history(), self.dir / "plots") if self.want_plots else []


def _nulls_for_nonfinite(metrics: dict) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or torn line (a kill mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_metrics(history: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per curve family; nothing (and no error) when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if not history:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, prefixes in PLOTS:
        keys = sorted({k for h in history for k in h
                       if k.startswith(prefixes) and k.endswith(("mean", "kl", "ratio", "loss", "per_s"))})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            pts = [(h["step"], h[k]) for h in history if isinstance(h.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
