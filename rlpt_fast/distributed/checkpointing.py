"""The trainer's checkpoints under torchrun: the one-GPU layout plus the sharded trainer state.

    checkpoints/step-00000012/
        adapter/ | model/ | merged/     as on one GPU (rank 0 writes; full FT gathered from shards)
        trainer_state.json              as on one GPU (rank 0 writes) plus "world_size"
        trainer_state_dcp/              torch DCP: trainable parameters, optimizer state, each
                                        rank's torch/CUDA RNG state (every rank writes its part)
Written into `.tmp-step-...` (the same name on every rank) and renamed by rank 0 once every rank
has finished, so a `step-*` directory is always complete. The output directory must be on a
filesystem every rank sees (one node: any local disk; several nodes: a shared one).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

from rlpt_fast.distributed.fsdp import save_hf_model
from rlpt_fast.distributed.state import load_sharded_state, save_sharded_state

DCP_DIR = "trainer_state_dcp"


def _python_numpy_rng(rng: dict) -> None:
    v, keys, gauss = rng["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, g = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))


def save_trainer_checkpoint(trainer) -> Path:
    """Collective: every rank calls it after the same step. Returns the checkpoint directory."""
    from rlpt_fast.model.lora_io import save_adapter, save_merged  # lazy: heavy
    from rlpt_fast.train import checkpoint as ckpt  # lazy: train imports this package

    dp, cfg = trainer.dist, trainer.cfg
    final = ckpt.step_dir(trainer.output_dir, trainer.state.step)
    tmp = final.parent / f".tmp-{final.name}"
    if dp.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dp.ctx.barrier()
    if not cfg.lora.enabled:
        save_hf_model(trainer.model, dp.ctx, cfg.model.path, tmp / "model")
    elif dp.is_main:
        save_adapter(trainer.model, tmp / "adapter", cfg.model.path)
        if cfg.train.save_merged:
            save_merged(trainer.model, cfg.model.path, tmp / "merged")
    save_sharded_state(tmp / DCP_DIR, trainer.model, trainer.optimizer, dp.ctx)
    if dp.is_main:
        s = trainer.state
        meta = {"format": ckpt.FORMAT, "step": s.step, "updates": s.updates, "nonfinite_streak": s.nonfinite_streak,
                "stream": trainer.stream.state_dict(), "rng": ckpt._rng_json(), "config": cfg.to_dict(),
                "world_size": dp.world_size, "sharded_state": DCP_DIR}
        (tmp / "trainer_state.json").write_text(json.dumps(meta))
    dp.ctx.barrier()  # every rank's DCP file is written
    if dp.is_main:
        ckpt._fsync_tree(tmp)
        ckpt.replace_dir(tmp, final)  # a step saved again is renamed aside, never deleted in place
    dp.ctx.barrier()  # nobody reads `final` before it exists
    return final


def load_trainer_checkpoint(trainer, path: str | Path):
    """Restores parameters, optimizer, RNG states; returns (TrainerState, stream state). Collective.
    Call it last in set-up (it sets the RNG states)."""
    from rlpt_fast.train import checkpoint as ckpt  # lazy: train imports this package

    path = Path(path)
    meta = json.loads((path / "trainer_state.json").read_text())
    if meta.get("format") != ckpt.FORMAT:
        raise ValueError(f"{path}: trainer_state.json format {meta.get('format')!r}, expected {ckpt.FORMAT}")
    if meta.get("sharded_state") != DCP_DIR:
        raise ValueError(f"{path} was written by a one-process run: resume it without torchrun "
                         f"(or start a new run from its weights)")
    if meta["world_size"] != trainer.dist.world_size:
        raise ValueError(f"{path} was written by {meta['world_size']} ranks, this run has "
                         f"{trainer.dist.world_size}: resume with torchrun --nproc_per_node={meta['world_size']}")
    load_sharded_state(path / DCP_DIR, trainer.model, trainer.optimizer, trainer.dist.ctx)
    _python_numpy_rng(meta["rng"])
    return ckpt.TrainerState(meta["step"], meta["updates"], meta["nonfinite_streak"]), meta["stream"]
