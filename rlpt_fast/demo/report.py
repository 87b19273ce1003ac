"""The demo's report: a markdown page (before/after table, reward curves, example captions)
and the one JSON object `rlpt demo` prints last."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .evaluate import PROTOCOL, EvalResult


def summary(before: EvalResult, after: EvalResult, *, steps: int, seconds: float, report: Path,
            extra: dict) -> dict:
    """The JSON object printed last (schema checked by tests/demo)."""
    out = {
        "before": before.summary(),
        "after": after.summary(),
        "f1_gain": round(after.f1 - before.f1, 2),
        "non_name_accuracy": {"before": round(before.non_name_accuracy, 2),
                              "after": round(after.non_name_accuracy, 2)},
        "steps": steps,
        "seconds": round(seconds, 1),
        "report": str(report),
        "captions": {"before": before.captions, "after": after.captions},
    }
    out.update(extra)
    return out


def _value(metrics: dict, key: str) -> float:
    """metrics[key], NaN (a gap in the curve) where absent or null (non-finite in metrics.jsonl)."""
    v = metrics.get(key)
    return float("nan") if v is None else v


def reward_curve(metrics_jsonl: Path, out: Path) -> Path | None:
    """reward_mean per GRPO step (and per task) as a PNG; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    hist = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    keys = ["reward_mean"] + sorted({k for h in hist for k in h
                                      if k.startswith("reward/") and k.endswith("/mean")})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in keys:
        ax.plot([h["step"] for h in hist], [_value(h, k) for h in hist], label=k)
    ax.set(title="RePIC name reward (mean over G samples)", xlabel="GRPO step", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    ax2.plot([h["step"] for h in hist], [_value(h, "kl") for h in hist], color="tab:red")
    ax2.set(title="KL to the base model (k3)", xlabel="GRPO step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _row(name: str, r: EvalResult) -> str:
    return (f"| {name} | {r.precision:.1f} | {r.recall:.1f} | {r.f1:.1f} | "
            f"{r.non_name_accuracy:.2f} |")


def _examples(before: EvalResult, after: EvalResult, n: int) -> list[str]:
    b = json.loads(Path(before.captions).read_text())
    a = json.loads(Path(after.captions).read_text())
    lines = []
    for rb, ra in list(zip(b, a))[:n]:
        lines += [f"- `{rb[0]}` (concepts {', '.join(rb[1])})",
                  f"  - before: {rb[2]}", f"  - after: {ra[2]}"]
    return lines


def write_report(path: Path, result: dict, before: EvalResult, after: EvalResult,
                 setup: list[str], plots: list[Path]) -> Path:
    """The markdown report. setup: bullet lines describing the world, model and run."""
    lines = [
        "# rlpt demo: GRPO post-tuning for personalized captioning", "",
        "## Setup", *[f"- {s}" for s in setup], "",
        "## Held-out queries (greedy captions, references inserted)", "",
        f"RePIC's name metric (`rlpt score-captions --protocol {PROTOCOL}`: every ground-truth "
        "slot, names lower-cased), in percent; non-name accuracy: agreement of the caption's "
        "words other than names with the scene's ground-truth caption (difflib ratio), in percent.",
        "",
        "| model | precision | recall | F1 | non-name accuracy |",
        "| --- | --- | --- | --- | --- |",
        _row("base (warm start)", before), _row("after GRPO", after), "",
        f"F1 gain: **{after.f1 - before.f1:+.1f}** points over {before.slots} name slots of "
        f"{before.queries} queries; non-name accuracy {before.non_name_accuracy:.2f} -> "
        f"{after.non_name_accuracy:.2f} ({after.non_name_accuracy - before.non_name_accuracy:+.2f}).", "",
        f"Caption files (RePIC format): `{before.captions}`, `{after.captions}`.", "",
        "## Reward curves", "",
    ]
    lines += [f"![{p.stem}]({os.path.relpath(p, path.parent)})" for p in plots] or \
        ["(matplotlib is not installed: see the trainer's metrics.jsonl)"]
    lines += ["", "## Example captions", "", *_examples(before, after, 5), "",
              "## Result", "", "```json", json.dumps(result, indent=2), "```", ""]
    path.write_text("\n".join(lines))
    return path
