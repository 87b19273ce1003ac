"""`rlpt train CONFIG.toml [--key=value ...] [--resume]`: GRPO post-training from a config file.

The algorithm is RePIC's (RECIPE.md) and the defaults reproduce its run; see
rlpt_fast/train/trainer.py for the step and rlpt_fast/train/config.py for every key.

    rlpt train run.toml                                  # one GPU (or the CPU)
    rlpt train run.toml --grpo.beta=0 --lr=2e-5          # overrides: --section.key=value or --key=value
    rlpt train run.toml --resume                         # continue from the latest checkpoint

A minimal config (every other key has RePIC's default; see rlpt_fast/train/config.py):

    [model]
    path = "/models/Qwen2.5-VL-7B-Instruct"     # a local Hugging Face directory
    [data]
    files = ["repic_train.jsonl"]               # RePIC rows; paths relative to this file
    [train]
    output_dir = "runs/repic"
    checkpoint_every = 100

Exit status 1 with a one-line reason on a bad config, bad data, a bad checkpoint to resume from,
a reward that raised, or too many non-finite steps in a row. The last line printed is a JSON
summary (steps, checkpoint, metrics).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__[__doc__.index("A minimal config"):__doc__.index("Exit status")].rstrip()
    p.add_argument("config", help="TOML file ([model], [lora], [data], [grpo], [optim], [train], [engine])")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in train.output_dir (fresh start if none)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key=value",
                   help="config overrides, values in TOML syntax (--grpo.beta=0, --data.files='[\"a.jsonl\"]')")


def run(args: argparse.Namespace) -> int:
    from rlpt_fast.data import DataError
    from rlpt_fast.train.config import ConfigError, load_config
    from rlpt_fast.train.scoring import RewardError

    overrides = [a for a in args.overrides if a != "--resume"]
    resume = args.resume or "--resume" in args.overrides
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"rlpt train: {e}", file=sys.stderr)
        return 1
    from rlpt_fast.distributed import RankFailedError, fail_together, init_distributed, shutdown
    from rlpt_fast.train.trainer import NonFiniteLossError, Trainer

    try:  # torchrun's ranks, or one process; its RuntimeErrors are set-up faults (no GPU, bad env)
        ctx = init_distributed(cfg.model.device, cfg.train.dist_timeout_s)
    except (RuntimeError, ValueError) as e:
        print(f"rlpt train: {e}", file=sys.stderr)
        return 1
    try:
        with fail_together(ctx):  # one rank fails: every rank stops with its error
            summary = Trainer(cfg, resume=resume).train()
    # OSError: a missing model directory or data file (named), a full disk while checkpointing
    except (DataError, RewardError, NonFiniteLossError, RankFailedError, ValueError, OSError) as e:
        print(f"rlpt train: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx)
    if ctx.is_main:  # under torchrun, one summary line
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0
