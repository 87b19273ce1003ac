"""Which prompts a rank takes: whole groups, micro-batch by micro-batch.

A step's global batch is `num_prompts` prompts split into `micro_batches` micro-batches of equal
size (gradient accumulation). Rank r takes the r-th contiguous slice of EVERY micro-batch:

    global micro-batch i:   [ p_0 ... p_{k-1} | p_k ... p_{2k-1} | ... ]     k = prompts per rank
                               rank 0             rank 1

so rank r's micro-batch i is a part of the single-process micro-batch i, and the union over ranks
is exactly the single-process batch in its order. A prompt's G completions are generated, scored
and trained where the prompt is, so group advantages need no communication.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def prompts_per_rank(num_prompts: int, world_size: int, micro_batches: int = 1) -> int:
    """Prompts each rank takes per micro-batch; raises unless the batch splits evenly."""
    if world_size < 1 or micro_batches < 1:
        raise ValueError(f"world_size ({world_size}) and micro_batches ({micro_batches}) must be >= 1")
    if num_prompts % (world_size * micro_batches):
        raise ValueError(f"{num_prompts} prompts per step do not split into {micro_batches} micro-batches on "
                         f"{world_size} ranks: make train.prompts_per_step a multiple of the world size "
                         f"({world_size}), keeping train.grad_accum={micro_batches}")
    return num_prompts // (world_size * micro_batches)


def shard_indices(num_prompts: int, world_size: int, rank: int, micro_batches: int = 1) -> list[int]:
    """Indices (into the step's global prompt list) that `rank` takes, in micro-batch order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    k = prompts_per_rank(num_prompts, world_size, micro_batches)
    per_mb = num_prompts // micro_batches
    return [i * per_mb + rank * k + j for i in range(micro_batches) for j in range(k)]


def shard_prompts(items: Sequence[T], world_size: int, rank: int, micro_batches: int = 1) -> list[T]:
    """The items (prompts, picks, rows) of `rank`; see shard_indices."""
    return [items[i] for i in shard_indices(len(items), world_size, rank, micro_batches)]


def group_members(prompt_indices: Sequence[int], group_size: int) -> list[int]:
    """Flat completion indices (prompt-major: completion j of prompt p is p * G + j) of the given
    prompts: all G completions of each prompt, never part of a group."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [p * group_size + j for p in prompt_indices for j in range(group_size)]
