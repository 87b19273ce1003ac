"""Host-side share of a decode step: the engine's Python work against the time the GPU computes.

Issue 4 asks for this profile at batch 64 to decide whether the engine's per-step host path must
move to C++ (csrc/): if the host's share of a decode step is above 10%, it must.

Each decode step ends in one host sync (the sampled tokens go to the host for stop detection).
Two figures per step:
  host_ms = step - wait, where `wait` is the time the host spends blocked at that sync (measured
    with a synchronize placed right after the runner's decode (forward and sampling, replayed from
    CUDA graphs on the GPU) returns, before the step's own sync, which then returns at once). An
    upper bound: the graph launches themselves are host work that overlaps the GPU.
  gpu_idle_ms = from that sync's return to the next graph launch (the next step's forward
    replay): postprocess, schedule and input building, during which the GPU has nothing queued.
    The share that counts.
Then it runs the same generate again under cProfile and prints the functions with the most host
time of their own. Last, stub_host_ms: the same generate with the decode graphs' replays stubbed
(StubGraphs: fixed samples, no device work), on the Triton attention path the GPU runs, so each
decode step is the host's own work alone: scheduling, the runner's Python, the sync. It runs on any
machine (the CPU included), and its share of a GPU step is the figure the 10% rule asks about.

    python benchmarks/profile_host.py                   # GPU: 3B shape, B = 8 x G = 8 = 64 sequences
    python benchmarks/profile_host.py --model tiny      # CPU: the same workload shape on the tiny model
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the stubbed run's Triton attention path (prefill's KV store) on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import build_models, build_prompts
from common import Report

import rlpt_fast.rollout.model_runner as model_runner
from rlpt_fast.rollout import Engine, Request, SamplingParams
from rlpt_fast.rollout.host_path import native_available


class SyncWait:
    """Wraps the runner's decode (forward + sampling, on CUDA graphs or eager): after each decode
    step's sampling, waits for the device and adds the time blocked to `seconds` (prefill steps are
    not counted)."""

    def __init__(self, device: str):
        self.device, self.seconds, self.steps = device, 0.0, 0
        self.idle, self.idle_steps, self.synced_at = 0.0, 0, None
        self._decode, self._run = model_runner.ModelRunner._decode, model_runner.ModelRunner.run
        self._replay = torch.cuda.CUDAGraph.replay

    def __enter__(self) -> SyncWait:
        me = self

        def run(runner, batch):
            if batch.is_prefill:  # a prefill between decode steps is not idle time
                me.synced_at = None
            return me._run(runner, batch)

        def decode(runner, batch):
            out = me._decode(runner, batch)
            if self.device.startswith("cuda"):
                t0 = time.perf_counter()
                torch.cuda.synchronize()
                me.synced_at = time.perf_counter()
                me.seconds += me.synced_at - t0
                me.steps += 1
            return out

        def replay(graph):
            if me.synced_at is not None:  # the first launch since the previous decode step's sync
                me.idle += time.perf_counter() - me.synced_at
                me.idle_steps += 1
                me.synced_at = None
            return me._replay(graph)

        model_runner.ModelRunner._decode, model_runner.ModelRunner.run = decode, run
        torch.cuda.CUDAGraph.replay = replay
        return self

    def __exit__(self, *exc) -> None:
        model_runner.ModelRunner._decode, model_runner.ModelRunner.run = self._decode, self._run
        torch.cuda.CUDAGraph.replay = self._replay


class StubGraphs:
    """Stands in for the runner's DecodeGraphs (the runner's graph path, whatever the device): each
    decode step returns fixed samples (token 7, log-prob 0) without touching the device."""

    def __init__(self, device: str, max_bs: int):
        self.samples = torch.zeros(max_bs, 2, dtype=torch.float64, device=device)
        self.samples[:, 0] = 7
        self.advanced_rows = 0

    def fits(self, b: int) -> bool:
        return b <= self.samples.shape[0]

    def run(self, inputs, tables, cascade, rows, positions) -> torch.Tensor:
        self.advanced_rows = len(positions)
        return self.samples[:len(positions)]


def stub_host_ms(model, prompts, requests, params, args) -> float:
    """Host ms per decode step with the device's decode work stubbed (StubGraphs), Triton backend."""
    engine = make_engine(model, prompts, args, attention_backend="triton", cuda_graphs=False)
    engine.runner.graphs = StubGraphs(str(model.device), len(prompts) * args.group)
    engine.generate(requests, params)  # warm-up: the host path's first call
    model.clear_image_cache()
    for key in engine.stats:
        engine.stats[key] = 0
    engine.generate(requests, params)
    return 1e3 * engine.stats["decode_seconds"] / max(1, engine.stats["decode_steps"])


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "3b"], default="3b" if gpu else "tiny")
    p.add_argument("--batch", type=int, default=8, help="prompts (B); B x G sequences decode together")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=1200)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--top", type=int, default=15, help="functions listed from the profile")
    return p.parse_args()


def make_engine(model, prompts, args, **config) -> Engine:
    t, n, bs = prompts[0][0].numel(), args.new_tokens, args.block_size
    blocks = len(prompts) * (-(-t // bs)) + len(prompts) * args.group * (-(-n // bs) + 2) + 16
    return Engine(model, block_size=bs, num_blocks=blocks, max_num_seqs=len(prompts) * args.group,
                  max_num_batched_tokens=8192, max_model_len=t + n + bs, **config)


def main() -> None:
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, theirs = build_models(args.model, device, dtype, Path(tmp))
    del theirs
    prompts = build_prompts(model.config, args.batch, args.prompt_tokens)
    engine = make_engine(model, prompts, args)
    requests = [Request(*p) for p in prompts]
    params = SamplingParams(n=args.group, temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True, seed=0)
    engine.generate(requests[:1], SamplingParams(n=2, max_tokens=4, ignore_eos=True))  # warm-up, graph capture

    def fresh_run():
        model.clear_image_cache()
        for key in engine.stats:
            engine.stats[key] = 0
        engine.generate(requests, params)
        return engine.stats["decode_seconds"] / max(1, engine.stats["decode_steps"])

    fresh_run()
    with SyncWait(device) as wait:
        step_s = fresh_run()
    wait_s = wait.seconds / max(1, wait.steps)
    idle_s = wait.idle / wait.idle_steps if wait.idle_steps else None
    profiler = cProfile.Profile()
    profiler.enable()
    fresh_run()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    graphed = engine.runner.graphs is not None
    del engine  # its KV cache, before the stubbed run's engine takes one
    stub_ms = stub_host_ms(model, prompts, requests, params, args)

    report = Report("host_profile", device)
    report.card = dict(model=f"{args.model} qwen2_5_vl (random weights) {dtype}", decode_batch=args.batch * args.group,
                       prompt_tokens=prompts[0][0].numel(), new_tokens=args.new_tokens,
                       cuda_graphs=graphed,
                       host_path=os.environ.get("RLPT_HOST_PATH", "auto") + f" (native built: {native_available()})")
    report.print_card()
    print(text.getvalue())
    host_ms, step_ms = 1e3 * (step_s - wait_s), 1e3 * step_s
    idle_ms = None if idle_s is None else 1e3 * idle_s
    report.rows.append(dict(decode_batch=args.batch * args.group, step_ms=step_ms, device_wait_ms=1e3 * wait_s,
                            host_ms=host_ms, host_share=host_ms / step_ms, gpu_idle_ms=idle_ms,
                            idle_share=None if idle_ms is None else idle_ms / step_ms, stub_host_ms=stub_ms,
                            stub_share=stub_ms / step_ms if device == "cuda" else None))
    report.print_table(["decode_batch", "step_ms", "device_wait_ms", "host_ms", "host_share", "gpu_idle_ms",
                        "idle_share", "stub_host_ms", "stub_share"])
    report.finish(dict(host_share=host_ms / step_ms, idle_share=None if idle_ms is None else idle_ms / step_ms,
                       stub_host_ms=stub_ms, stub_share=stub_ms / step_ms if device == "cuda" else None,
                       goal="host share <= 10% of a decode step at batch 64, else move the hot path to csrc/"))


if __name__ == "__main__":
    main()
