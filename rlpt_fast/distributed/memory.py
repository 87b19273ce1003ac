"""The memory plan of one rank, from the model's own cost accounting, and its check against what
the rank really holds.

Per rank, in bytes (W = decoder + head weight bytes, V = vision tower, A = trainable bytes,
N = world size):
                      FSDP full fine-tuning       replicated LoRA           one process
    weights           W / N + V                   W + V (adapters in)       W + V
    gathered          W - W / N (engine only)     0                         0
    gradients         A / N                       A                         A
    optimizer         2 A / N (AdamW moments)     2 A                       2 A
    kv_cache          the engine's cache (kv_bytes_per_token x cached tokens)
Generation holds weights + gathered + optimizer + kv_cache; training holds weights + gradients +
optimizer plus activations, which the plan leaves out (they depend on sequence lengths and
checkpointing) and the measured peak shows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

_PARTS = ("weights", "gathered", "gradients", "optimizer", "kv_cache")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank; see the module docstring. strategy: fsdp | replicate | single."""
    world_size: int
    strategy: str
    weights: int
    gathered: int
    gradients: int
    optimizer: int
    kv_cache: int

    @property
    def generation(self) -> int:
        return self.weights + self.gathered + self.optimizer + self.kv_cache

    @property
    def training(self) -> int:
        """Static part of training (activations excluded)."""
        return self.weights + self.gradients + self.optimizer + self.kv_cache

    @property
    def peak(self) -> int:
        return max(self.generation, self.training)

    def to_dict(self) -> dict:
        return {**asdict(self), "generation": self.generation, "training": self.training, "peak": self.peak}

    def table(self) -> str:
        """What `rlpt train` prints at start (MiB per rank)."""
        rows = [f"memory plan per rank ({self.strategy}, {self.world_size} rank(s)), MiB:"]
        rows += [f"  {name:<22}{getattr(self, name) / 2**20:>12.1f}" for name in _PARTS]
        rows += [f"  {'generation (sum)':<22}{self.generation / 2**20:>12.1f}",
                 f"  {'training w/o activ.':<22}{self.training / 2**20:>12.1f}"]
        return "\n".join(rows)


def _param_bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()  # a DTensor's numel is the global one
    return total


def plan_memory(model: nn.Module, *, world_size: int, sharded: bool, kv_cache_bytes: int = 0,
                optimizer_moments: int = 2) -> MemoryPlan:
    """The plan of one rank. model: the training model (LoRA applied if any; wrapped or not).
    sharded: FSDP full fine-tuning (else replicated). kv_cache_bytes: the engine's cache
    (engine.num_blocks * block_size * model.kv_bytes_per_token())."""
    if world_size < 1:
        raise ValueError(f"plan_memory: world_size must be >= 1, got {world_size}")
    text, vision = model.weight_bytes(), model.vision_weight_bytes()
    trainable = _param_bytes(p for p in model.parameters() if p.requires_grad)
    n = world_size if sharded else 1
    strategy = "single" if world_size == 1 else ("fsdp" if sharded else "replicate")
    shard = -(-text // n)
    return MemoryPlan(world_size, strategy, weights=shard + vision, gathered=text - shard,
                      gradients=-(-trainable // n), optimizer=optimizer_moments * -(-trainable // n),
                      kv_cache=int(kv_cache_bytes))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's own shard


def _local_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = _local(t)
        if t.numel() > 1 and t.data_ptr() not in seen:  # scalars (AdamW's step) are noise
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measured_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   kv_cache_bytes: int = 0) -> dict[str, int]:
    """Bytes this rank really holds, by part (local shards of sharded tensors); "gradients" only
    while gradients exist."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    opt = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)] if optimizer else []
    out = {"weights": _local_bytes(model.parameters()), "optimizer": _local_bytes(opt),
           "kv_cache": int(kv_cache_bytes)}
    if grads:  # between updates they are freed (zero_grad(set_to_none=True)): nothing to compare
        out["gradients"] = _local_bytes(grads)
    return out


def check_plan(plan: MemoryPlan, measured: dict[str, int], peak_bytes: int | None = None,
               rel_tol: float = 0.02) -> tuple[bool, list[str]]:
    """Compares the plan with measured_state (and a measured peak, e.g. torch.cuda.max_memory_allocated).
    Each measured part must be within rel_tol of the plan (FSDP's uneven last shard and 1-element
    tensors make the small difference); the peak must at least cover the plan's static training
    part. Returns (ok, report lines)."""
    ok, lines = True, []
    for part, got in measured.items():
        want = getattr(plan, part)
        good = abs(got - want) <= rel_tol * max(want, 1) + 4096
        ok &= good
        lines.append(f"{part:<10} planned {want / 2**20:10.2f} MiB  measured {got / 2**20:10.2f} MiB"
                     f"{'' if good else '  <-- off plan'}")
    if peak_bytes is not None:
        good = peak_bytes >= plan.training - 4096
        ok &= good
        lines.append(f"peak       static plan {plan.training / 2**20:10.2f} MiB  measured peak "
                     f"{peak_bytes / 2**20:10.2f} MiB (activations and allocator make the rest)"
                     f"{'' if good else '  <-- below the plan: the plan overcounts'}")
    return ok, lines
