"""Process-group set-up from torchrun's environment, and the DistContext every rank carries.

    ctx = init_distributed()          # under torchrun: joins the group; alone: world size 1
    ctx.rank, ctx.world_size, ctx.device, ctx.is_main

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. With WORLD_SIZE
absent or 1 no process group is created (a clean single-process run: every helper in this package
is then a no-op), so the same code runs under `python -m` and under `torchrun`.

Backends: "gloo" on the CPU; "cpu:gloo,cuda:nccl" on GPUs, so that CUDA tensors go through NCCL
and the few small CPU tensors (metric sums, failure flags) through gloo. Every collective gets
`timeout_s`: a rank that stops answering raises on its peers instead of hanging them forever
(NCCL enforces it through its watchdog, gloo in the call itself).
"""
from __future__ import annotations

import gc
import os
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Who this process is. device: where its model and tensors live (cuda:LOCAL_RANK on GPUs)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: single process, no process group
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"DistContext: rank {self.rank} is outside world size {self.world_size}")
        if self.world_size > 1 and self.backend is None:
            raise ValueError(f"DistContext: world size {self.world_size} needs a backend")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes the shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def _device_for(requested: str, local_rank: int, world: int) -> torch.device:
    """Alone: the requested device as given. Under torchrun: GPU LOCAL_RANK (an index in
    `requested` is ignored: each rank owns its own GPU), made the current device."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {requested!r} asked for, but no CUDA device is available")
        if world == 1:
            return device
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                               "give torchrun --nproc_per_node at most the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join torchrun's process group (or return the single-process context).

    device: "auto" (GPU LOCAL_RANK when CUDA is available, else the CPU), "cpu" or "cuda".
    timeout_s: limit of every collective; a peer that died or hangs surfaces as an error then.
    Calling it again in a process whose group exists returns the same context.
    """
    if timeout_s <= 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0, got {timeout_s}")
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = _device_for(device, local_rank, world)
    if world == 1:
        return DistContext(device=dev, timeout_s=timeout_s)
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun")
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"a process group exists with rank {dist.get_rank()}/{dist.get_world_size()}, "
                           f"but the environment says {rank}/{world}")
    return DistContext(rank, world, local_rank, dev, backend, timeout_s)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (end of a run). Safe to call twice or without a group. Ranks
    leave together: one tearing its connections down while a peer still uses them can abort
    that peer in gloo's C++ (seen as "terminate called without an active exception"). Drop the
    references to sharded models before calling it."""
    if ctx.distributed and dist.is_initialized():
        # FSDP modules sit in reference cycles that hold the device mesh and its process group;
        # collected at interpreter exit instead, they tear gloo down too late (SIGABRT).
        gc.collect()
        with suppress(Exception):  # after a failure the peers may be gone already
            dist.barrier()
        dist.destroy_process_group()
