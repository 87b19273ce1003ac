"""What every benchmark shares: timing, the device's measured ceilings, and the report format.

Each benchmark prints a card (device, versions, shapes), a fixed-width table, and ONE JSON object
as its last line, and appends the same record to benchmarks/results/<subject>.jsonl
(RLPT_RESULTS_DIR names another folder: `gpu_sweep.sh --dry-run` keeps CPU records out of results/).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(os.environ.get("RLPT_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def baseline_versions() -> str:
    """Versions of the packages the baselines come from ("-": not installed), without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"
    return ", ".join(f"{name} {one(name)}" for name in ("transformers", "trl", "liger-kernel"))


def git_revision() -> str:
    """HEAD's short hash, "-dirty" appended when files git does not ignore differ from it (a
    record of a tree others were editing is not a record of HEAD), records under results/ aside:
    one benchmark's new record does not make the next one's code dirty. RLPT_GIT_REV names it
    where the tree is an export without .git (gpu_sweep.sh sets it, by the same rule)."""
    if os.environ.get("RLPT_GIT_REV"):
        return os.environ["RLPT_GIT_REV"]
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=here, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--", ":/", ":(top,exclude)benchmarks/results"],
                                capture_output=True, text=True, cwd=here)
        return out.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Milliseconds: median and 20th/80th percentiles over the repeats."""
    median: float
    p20: float
    p80: float

    def as_dict(self) -> dict:
        return {"median_ms": self.median, "p20_ms": self.p20, "p80_ms": self.p80}


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 3, repeat: int = 10) -> Timing:
    """Times fn() with device events on CUDA, with a host clock after a sync on the CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7])


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated above what was allocated before fn() ran (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


@dataclass
class Ceilings:
    """The card's measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    copy_gbps: float
    matmul_tflops: float


def measure_ceilings(device: str) -> Ceilings:
    if device.startswith("cuda"):
        n = 1 << 28  # 512 MiB of bf16 per buffer: far beyond L2
        a = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
        b = torch.empty_like(a)
        t = time_fn(lambda: b.copy_(a), device, warmup=3, repeat=20)
        copy = 2 * a.numel() * a.element_size() / (t.median * 1e-3) / 1e9
        m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
        t = time_fn(lambda: m @ m, device, warmup=3, repeat=20)
        flops = 2 * 8192**3 / (t.median * 1e-3) / 1e12
        return Ceilings(copy, flops)
    n = 1 << 24
    a = torch.rand(n)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, warmup=2, repeat=5)
    copy = 2 * a.numel() * 4 / (t.median * 1e-3) / 1e9
    m = torch.randn(1024, 1024)
    t = time_fn(lambda: m @ m, device, warmup=2, repeat=5)
    return Ceilings(copy, 2 * 1024**3 / (t.median * 1e-3) / 1e12)


@dataclass
class Report:
    """Collects rows and prints card, table and the final JSON line."""
    subject: str
    device: str
    card: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def header(self) -> dict:
        import triton  # noqa: PLC0415  (optional at import time of this module)

        return {
            "subject": self.subject,
            "device": device_name(self.device),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "baselines": baseline_versions(),
            "git": git_revision(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "gpu": self.device.startswith("cuda"),
        }

    def print_card(self) -> None:
        print(f"== {self.subject} ==")
        for key, value in {**self.header(), **self.card}.items():
            print(f"  {key:<16} {value}")
        if not self.device.startswith("cuda"):
            print("  NOTE             no GPU: small CPU shapes; GPU figures are owed")

    def print_table(self, columns: list[str]) -> None:
        widths = [max(len(c), *(len(_fmt(r.get(c))) for r in self.rows)) for c in columns]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        print("  ".join("-" * w for w in widths))
        for row in self.rows:
            print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))

    def finish(self, summary: dict | None = None) -> dict:
        record = {**self.header(), "card": self.card, "rows": self.rows, "summary": summary or {}}
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / f"{self.subject}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))
        return record


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
