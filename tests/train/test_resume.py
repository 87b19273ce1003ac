"""A run killed with SIGKILL mid-step and resumed ends exactly like an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlpt_fast.train.metrics import numeric_part

from .conftest import HERE, small_overrides

RLPT = [sys.executable, "-c", "import sys; from rlpt_fast.cli import main; sys.exit(main())"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def _config(tmp: Path, ckpt, world, name: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text("[train]\nmax_steps = 4\ncheckpoint_every = 2\nprompts_per_step = 2\n")
    return path


def _args(tmp: Path, ckpt, world, name: str) -> list[str]:
    return ["train", str(_config(tmp, ckpt, world, name))] + small_overrides(ckpt, world, tmp / name)


def _metrics(run: Path) -> list[dict]:
    return [numeric_part(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_step_then_resume_matches_uninterrupted(tmp_path, ckpt, world):
    env = _env()
    full = subprocess.run(RLPT + _args(tmp_path, ckpt, world, "full"), env=env, capture_output=True, text=True, check=False)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "cut"
    proc = subprocess.Popen(RLPT + _args(tmp_path, ckpt, world, "cut"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = run / "checkpoints" / "step-00000002"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # step 3 starts as soon as checkpoint 2 is renamed into place: kill inside it
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_dir() and not (run / "checkpoints" / "step-00000004").exists()

    resumed = subprocess.run(RLPT + _args(tmp_path, ckpt, world, "cut") + ["--resume"], env=env,
                             capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _metrics(tmp_path / "full"), _metrics(run)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert a == b
    assert any(m["loss"] != 0 for m in a)
    wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run / "checkpoints" / "step-00000004" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.endswith("lora_B.weight") and wa[k].abs().max() > 0 for k in wa)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["checkpoint"].endswith("step-00000004")
