"""The trainer under torchrun, for tests/distributed/test_trainer_parity.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed/train_worker.py MODE OUT --key=value...

MODE: run (Trainer.train()), stop (2 steps, a checkpoint, exit: an interrupted run),
resume (Trainer(resume=True).train()). The config is built from the overrides alone.
"""
from __future__ import annotations

import os
import sys

import torch


def main(argv: list[str]) -> None:
    mode, overrides = argv[0], argv[1:]
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    from rlpt_fast.distributed import shutdown
    from rlpt_fast.train import Trainer, load_config

    trainer = Trainer(load_config(None, overrides), resume=mode == "resume")
    ctx = trainer.dist.ctx
    try:
        if mode == "stop":
            for _ in range(2):
                trainer.step()
            trainer.save()
        else:
            trainer.train()
    finally:
        del trainer  # the sharded model must go before the process group (shutdown's docstring)
        shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
