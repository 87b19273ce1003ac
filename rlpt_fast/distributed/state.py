"""Sharded trainer state with torch's distributed checkpoint (DCP), for resume at the same world size.

What goes in (a DCP directory: one `__<rank>_0.distcp` file per rank and DCP's `.metadata`):
    model   the trainable parameters (FSDP: each rank writes its own shards; replicated LoRA
            adapters: written once) -- frozen weights are not state, they come from the base
    optim   the optimizer state keyed by parameter name (DCP's get_state_dict layout)
    rng     this rank's torch (and CUDA) generator states, one entry per rank
    meta    the world size, checked before anything is loaded
The Hugging Face / PEFT directories and the JSON trainer state stay as on one GPU (rank 0 writes
them); this holds what only exists sharded or per rank. No user file is pickled: DCP writes its
own format.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from rlpt_fast.distributed.context import DistContext

_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: the frozen weights are absent on purpose (not state); dcp.load already fails on any
# trainable tensor missing from the checkpoint.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextmanager
def _quiet_alone(ctx: DistContext):
    """DCP warns that it runs in one process; alone, that is the intent."""
    with warnings.catch_warnings():
        if not ctx.distributed:
            warnings.simplefilter("ignore", UserWarning)
        yield


def _rng_state(ctx: DistContext) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return out


def _payload(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    return {"model": model_sd, "optim": optim_sd, "rng": {f"rank{ctx.rank:05d}": _rng_state(ctx)},
            "meta": {"world_size": torch.tensor(ctx.world_size)}}


def save_sharded_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       ctx: DistContext) -> Path:
    """Writes the DCP directory `path` (collective: every rank calls it, with the same path)."""
    path = Path(path)
    with _quiet_alone(ctx):
        dcp.save(_payload(model, optimizer, ctx), checkpoint_id=str(path), no_dist=not ctx.distributed)
    return path


def saved_world_size(path: str | Path) -> int:
    """World size of the run that wrote the DCP directory `path`."""
    meta = {"meta": {"world_size": torch.tensor(0)}}
    with warnings.catch_warnings():  # no_dist on purpose: each rank reads this one number alone
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(meta, checkpoint_id=str(path), no_dist=True)
    return int(meta["meta"]["world_size"])


def load_sharded_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                       ctx: DistContext) -> None:
    """Restores trainable parameters, optimizer state and this rank's RNG states from `path`
    (collective). The model and optimizer must be built, and sharded, as when it was saved."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a distributed checkpoint (no .metadata)")
    saved = saved_world_size(path)
    if saved != ctx.world_size:
        raise ValueError(f"{path} was written by {saved} ranks, this run has {ctx.world_size}: resume with "
                         f"torchrun --nproc_per_node={saved} (per-rank RNG and data shards depend on it)")
    state = _payload(model, optimizer, ctx)
    with _quiet_alone(ctx):
        dcp.load(state, checkpoint_id=str(path), no_dist=not ctx.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_LOAD_OPTIONS)
    rng = state["rng"][f"rank{ctx.rank:05d}"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
