"""`rlpt demo`: the embedded default, GRPO post-tuning for personalized captioning on a laptop.

    rlpt demo [--out rlpt-demo] [--seed 0] [--threads 2]

Builds a synthetic personal-concept world (one user's cast of named concepts), a tiny
Qwen2.5-VL-architecture model with a short supervised warm start (captions mostly generic, now
and then personalized), scores it on held-out queries with RePIC's metric, post-tunes it with
GRPO and RePIC's rewards (rlpt_fast.train.Trainer), scores it again, and writes a report. The
last line printed is one JSON object: before/after precision, recall, F1, the non-name word
accuracy, steps, seconds and the output paths. No GPU and no download needed (a GPU is used
when present). Simplifications: see rlpt_fast/demo/*.py module docstrings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# OpenMP threads that spin while waiting are many times slower as soon as the cores are shared
# (measured on a shared 2-core machine: 2.3 s vs 0.38 s per warm-start step). Must be set before
# torch loads libgomp, i.e. before the imports below; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .base_model import BaseModelConfig  # noqa: E402  (after the OpenMP setting)
from .pipeline import DemoConfig, run_demo  # noqa: E402
from .rl import RLConfig  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default="rlpt-demo", help="output directory (default: rlpt-demo)")
    g.add_argument("--seed", type=int, default=0, help="seed of the world, model and run")
    g.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    w = p.add_argument_group("warm start")
    w.add_argument("--warm-steps", type=int, default=BaseModelConfig.steps,
                   help="supervised warm-start steps")
    w.add_argument("--personal-rate", type=float, default=BaseModelConfig.personal_rate,
                   help="fraction of warm-start captions that name the concepts")
    w.add_argument("--pretrain-scenes", type=int, default=DemoConfig.pretrain_scenes,
                   help="scenes beyond the RL training scenes that only the warm start sees")
    r = p.add_argument_group("GRPO")
    r.add_argument("--rl-steps", type=int, default=RLConfig.steps, help="GRPO steps")
    r.add_argument("--lr", type=float, default=RLConfig.lr, help="GRPO learning rate (LoRA)")
    r.add_argument("--beta", type=float, default=RLConfig.beta, help="KL coefficient")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    return DemoConfig(out_dir=args.out, seed=args.seed, threads=args.threads,
                      pretrain_scenes=args.pretrain_scenes,
                      base=BaseModelConfig(steps=args.warm_steps, personal_rate=args.personal_rate),
                      rl=RLConfig(steps=args.rl_steps, lr=args.lr, beta=args.beta))


def run(args: argparse.Namespace) -> int:
    result = run_demo(config_from_args(args), log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result), flush=True)
    return 0
