"""A tiny checkpoint and a torchrun launcher for the distributed tests (2 CPU ranks, gloo)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlpt_fast.testing import write_tiny_checkpoint

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="session")
def dist_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("dist_ckpt"), "qwen2_5_vl", seed=0)


def torchrun(args: list[str], *, nproc: int = 2, timeout_s: float = 180, env: dict | None = None,
             script: Path = WORKER, command: list[str] | None = None
             ) -> tuple[subprocess.CompletedProcess, float]:
    """`torchrun --standalone --nproc_per_node=nproc script args` (or `--no-python command args`);
    returns (the finished process, seconds)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
                **(env or {})}
    target = ["--no-python", *command] if command else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=full_env, check=False)
    return proc, time.monotonic() - start
