"""bench_kernels checks every candidate's values before it times them: a wrong "ours" is marked
"wrong", the summary says values_ok false and the script exits 1 (its figures still recorded);
a correct run passes. Tiny CPU shapes through the script's entry point, ours on the torch backend.
"""
import json
import runpy
import sys
from pathlib import Path

import pytest

import rlpt_kernels

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--tokens", "64", "--vocab", "512", "--hidden", "32"]


@pytest.fixture
def run_bench(monkeypatch, tmp_path):
    """Runs benchmarks/bench_kernels.py as __main__; returns (exit status, the record it wrote)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common  # noqa: PLC0415 - benchmarks/ is importable only from here on

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # test records stay out of results/

    def run(*args: str) -> tuple[int, dict]:
        monkeypatch.setattr(sys, "argv", ["bench_kernels.py", *TINY, *args])
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(BENCH / "bench_kernels.py"), run_name="__main__")
        lines = (tmp_path / "kernels.jsonl").read_text().splitlines()
        return exited.value.code, json.loads(lines[-1])
    return run


def _rows(record: dict, impl: str) -> list[dict]:
    return [r for r in record["rows"] if r["impl"] == impl]


def _off(fn, delta=0.0, scale=1.0):
    """fn with its first output moved: a kernel that computes the wrong values."""
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * scale + delta, *out[1:])
        return out * scale + delta
    return wrong


@pytest.mark.parametrize("op, name, wrong", [
    ("logprobs", "token_logprobs", dict(delta=0.1)),
    ("grpo", "grpo_loss", dict(scale=1.1)),  # a wrong normalizer: loss and gradients 10% off
    ("fused_linear", "grpo_loss_from_hidden", dict(scale=1.1)),
])
def test_a_wrong_kernel_is_caught(run_bench, monkeypatch, op, name, wrong):
    monkeypatch.setattr(rlpt_kernels, name, _off(getattr(rlpt_kernels, name), **wrong))
    code, record = run_bench("--ops", op)
    ours = _rows(record, "ours")
    assert code == 1 and record["summary"]["values_ok"] is False
    assert len(ours) == 1 and ours[0]["status"].startswith("wrong: max_err")
    assert ours[0]["max_err"] > 1e-3 > ours[0]["tol"]
    assert "median_ms" in ours[0]  # the wrong kernel's figures are still recorded
    naive = _rows(record, "torch naive") + _rows(record, "bare matmuls")
    assert naive and all(r["status"] == "ok" for r in naive)


def test_a_correct_run_passes(run_bench):
    code, record = run_bench()
    assert code == 0 and record["summary"]["values_ok"] is True
    ours = _rows(record, "ours")
    assert len(ours) == 3 and all(r["status"] == "ok" for r in ours)
    assert all(r["max_err"] <= r["tol"] for r in ours)
    # every candidate with a value was checked, the baselines too
    checked = [r for r in record["rows"] if r["impl"] != "bare matmuls"]
    assert all(r["max_err"] is not None and r["max_err"] <= r["tol"] for r in checked)
