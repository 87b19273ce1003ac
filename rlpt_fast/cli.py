"""The `rlpt` command line.

Each subcommand lives in its own module, which provides two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Registering one is a line in COMMANDS; its
module is imported only when that subcommand runs (so `rlpt score-captions` does not import
torch or the model).

    rlpt score-captions FILE... --protocol single|2-concept|4-concept
                        [--strict --database DB] [--json]
"""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module providing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "score-captions": ("rlpt_fast.metrics",
                       "RePIC's name precision/recall/F1 of personalized caption files"),
    "train": ("rlpt_fast.train.cli", "GRPO post-training from a TOML config (RePIC's recipe by default)"),
    "caption": ("rlpt_fast.caption", "personalized captions of a query set (skip-retrieval, greedy)"),
    "demo": ("rlpt_fast.demo.command", "the embedded default: GRPO on a tiny VLM in a synthetic world (CPU, no downloads)"),
}


def register(name: str, module: str, help: str) -> None:
    """Add a subcommand (for modules that are not listed in COMMANDS)."""
    COMMANDS[name] = (module, help)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `selected`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="rlpt", description="Fast GRPO post-training of "
                                     "Qwen2-VL / Qwen2.5-VL for personalized captioning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(selected).parse_args(argv)
    # The console-script wrapper passes the return value to sys.exit.
    return int(import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":  # `python -m rlpt_fast.cli ...`, e.g. under `torchrun -m`
    sys.exit(main())
