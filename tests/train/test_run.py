"""Trainer.train: what a user sees (metrics.jsonl, plots, progress bar) and the engine under pressure."""
import json
from pathlib import Path

import pytest

from rlpt_fast.prompts import row_rng
from rlpt_fast.rollout import Engine
from rlpt_fast.train.trainer import Trainer

from .test_trainer import STEP_KEYS


def test_train_writes_metrics_plots_and_progress(make_config, capsys):
    cfg = make_config("--train.max_steps=2", "--train.progress=true", "--train.plots=true")
    summary = Trainer(cfg).train()
    lines = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(STEP_KEYS <= set(m) for m in lines)
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step-00000002")
    names = {p.rsplit("/", 1)[-1] for p in summary["plots"]}
    assert {"reward.png", "kl.png", "completion_length.png", "clip_ratio.png"} <= names
    for p in summary["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    assert "2/2" in err and ("s/step" in err or "step/s" in err)  # tqdm bar: count, rate, ETA
    saved = json.loads((Path(cfg.train.output_dir) / "config.json").read_text())
    assert saved["grpo"]["num_generations"] == 4


def test_out_of_kv_blocks_preempts_and_keeps_every_sequence(make_config):
    tr = Trainer(make_config("--train.prompts_per_step=2"))
    seed = tr.cfg.train.seed
    longest = max(tr.builder.training_prompt(tr.rows[i], row_rng(seed, 0, i)).input_ids.numel()
                  for i in tr.stream.order(0)[:2])
    # room for one prompt and 4 more blocks: its 4 forks (8 tokens, 2+ blocks each) cannot all fit
    tr.engine = Engine(tr.model, block_size=4, num_blocks=-(-(longest + 8) // 4) + 4)
    tr.sampling_overrides = {"ignore_eos": True}
    m = tr.step()
    assert m["preemptions"] > 0
    assert all(r.lengths == [8] * 4 for r in tr.last_rollouts)
    assert m["completion_length_min"] == 8 and not m["skipped"]


def test_monitor_sends_numeric_metrics_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    from rlpt_fast.train.monitor import Monitor

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("dir", logdir))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def close(self):
            calls.append(("closed",))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    mon = Monitor(tmp_path, 1, progress=False, tensorboard=True, plots=False)
    mon.log({"step": 1, "reward_mean": 0.5, "kl": float("nan"), "skipped": False, "reward/iou/mean": 1.0})
    mon.close()
    assert calls == [("dir", str(tmp_path / "tensorboard")), ("step", 1, 1), ("reward_mean", 0.5, 1),
                     ("reward/iou/mean", 1.0, 1), ("closed",)]


def test_metrics_jsonl_is_strict_json_with_null_for_a_non_finite_value(tmp_path):
    """A skipped step's loss is NaN: written as null (Python's NaN token is not JSON; jq refuses it)
    and drawn as a gap, the other values kept."""
    from rlpt_fast.demo.report import reward_curve
    from rlpt_fast.train.monitor import Monitor

    mon = Monitor(tmp_path, 2, progress=False, tensorboard=False, plots=True)
    for step, loss in ((1, 0.5), (2, float("nan"))):
        mon.log({"step": step, "loss": loss, "kl": 0.01, "reward_mean": 0.5, "skipped": loss != loss,
                 "completion_length_mean": 9.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}")) for line in lines]
    assert strict[1]["loss"] is None and strict[1]["kl"] == 0.01 and strict[0]["loss"] == 0.5
    pytest.importorskip("matplotlib")
    assert {p.name for p in mon.close()} >= {"reward.png", "kl.png"}
    assert reward_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png").exists()
