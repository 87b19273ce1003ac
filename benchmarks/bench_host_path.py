"""Host cost of the scheduler's decode bookkeeping per step, no model: Python path vs native (C++).

Issue 4: a decode step at batch 64 must not spend more than 10% of its time on host work. This
isolates the part of that host work that lives in the scheduler, block manager and sequences
(schedule: can_append / append_slot / copy-on-write; postprocess: append the sampled token,
commit full blocks to the prefix cache, stop rules, retire) and times it with fake sampled tokens,
so it runs anywhere. The model runner's per-step input building is NOT included.

Workload (GRPO-shaped, as bench_rollout.py): B prompts of ~P tokens, each forked into G samples
(B x G sequences decode together), block_size 16, T new tokens, ignore_eos (no stop ids), prefix
caching on and off; each host path ("python", "native" when rlpt_fast._host is built) is timed
per decode step (schedule + postprocess, the fake samples built outside the clock).

    taskset -c 0 python benchmarks/bench_host_path.py            # B = 8, G = 8, P = 1200, T = 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report

from rlpt_fast.rollout import host_path
from rlpt_fast.rollout.block_manager import BlockManager
from rlpt_fast.rollout.scheduler import Scheduler, SchedulerConfig
from rlpt_fast.rollout.sequence import Sequence, StopRule


def fake_token(seq: Sequence) -> int:
    return (seq.num_tokens * 31 + seq.sample_index * 7) % 1000 + 1


def run_once(args, mode: str, prefix: bool) -> dict:
    """One full generate's worth of scheduling; returns per-decode-step host times (ms)."""
    bs = args.block_size
    num_blocks = args.batch * -(-args.prompt_len // bs) + args.batch * args.group * (args.new_tokens // bs + 2)
    sched = Scheduler(SchedulerConfig(max_num_seqs=args.batch * args.group, max_num_batched_tokens=4096,
                                      max_model_len=args.prompt_len + args.new_tokens + 16, host_path=mode),
                      BlockManager(num_blocks, bs, enable_prefix_caching=prefix))
    for r in range(args.batch):
        prompt = [(r * 1009 + i * 13) % 5000 for i in range(args.prompt_len)]
        sched.add(Sequence(prompt, len(prompt), StopRule(args.new_tokens, frozenset(), 1 << 30),
                           request_index=r, num_samples=args.group))
    sched_ms, post_ms, finished = [], [], 0
    while not sched.is_finished():
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        samples = [[(fake_token(s), -0.5)] * k for s, k in zip(batch.seqs, batch.num_samples)]
        t2 = time.perf_counter()
        done = sched.postprocess(batch, samples)
        t3 = time.perf_counter()
        finished += len(done)
        if not batch.is_prefill:
            sched_ms.append((t1 - t0) * 1e3)
            post_ms.append((t3 - t2) * 1e3)
    if finished != args.batch * args.group:
        raise RuntimeError(f"{mode}: {finished} sequences finished, expected {args.batch * args.group}")
    return {"schedule": sched_ms, "postprocess": post_ms}


def measure(args, mode: str, prefix: bool) -> dict:
    runs = [run_once(args, mode, prefix) for _ in range(args.repeat)]
    # median over repeats of each run's median step: robust to the shared cores' noise
    med = {k: statistics.median(statistics.median(r[k]) for r in runs) for k in ("schedule", "postprocess")}
    total = [a + b for r in runs for a, b in zip(r["schedule"], r["postprocess"])]
    q = statistics.quantiles(total, n=10)
    return {"host_path": mode, "prefix_caching": prefix, "decode_steps": len(runs[0]["schedule"]),
            "schedule_ms": med["schedule"], "postprocess_ms": med["postprocess"],
            "step_ms": med["schedule"] + med["postprocess"], "p20_ms": q[1], "p80_ms": q[7]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="prompts (B)")
    p.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=1200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5, help="whole runs per configuration")
    args = p.parse_args()
    modes = ["python"] + (["native"] if host_path.native_available() else [])
    report = Report("host_path", "cpu")
    report.card = {"sequences": args.batch * args.group, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "block_size": args.block_size, "repeat": args.repeat,
                   "native": host_path.native_available() or host_path.native_import_error()}
    report.print_card()
    for prefix in (False, True):
        for mode in modes:
            report.rows.append(measure(args, mode, prefix))
    report.print_table(["host_path", "prefix_caching", "decode_steps", "schedule_ms", "postprocess_ms",
                        "step_ms", "p20_ms", "p80_ms"])
    summary = {}
    for prefix in (False, True):
        rows = {r["host_path"]: r for r in report.rows if r["prefix_caching"] == prefix}
        if "native" in rows:
            summary[f"saved_ms_prefix_{prefix}"] = rows["python"]["step_ms"] - rows["native"]["step_ms"]
            summary[f"speedup_prefix_{prefix}"] = rows["python"]["step_ms"] / rows["native"]["step_ms"]
    report.finish(summary)


if __name__ == "__main__":
    main()
