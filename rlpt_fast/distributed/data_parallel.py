"""DataParallel: what the GRPO trainer asks of the ranks, in one object (every method is the plain
single-process behaviour when the world size is 1, so the trainer has one code path).

How the trainer uses it (rlpt_fast/train/trainer.py):
    the step's prompts   global list -> `my_indices` (whole groups, micro-batch slices); the
                         rollout seeds use the GLOBAL prompt index, so sampling is the one-process
                         run's whatever the world size
    generation           inside `gathered(model)` (full FT: FSDP groups all-gathered once)
    advantages           per group, local; scale_rewards="batch" needs the global std: gathered
    loss                 `loss_factor`: the local loss is scaled so that averaging gradients over
                         ranks (FSDP's reduce-scatter, LoRA's all-reduce) gives the one-process
                         gradient for every loss_type (grpo, dr_grpo: 1; dapo: W; bnpo:
                         W * local tokens / global tokens of the micro-batch)
    skip decisions       `agree`: a non-finite loss on one rank skips the update on all
    after backward       `finish_backward` (LoRA: average adapter gradients), `clip`
    metrics              `reduce`: rank 0 logs the metrics of the whole batch
    outputs              `is_main` writes; `monitor` gives the other ranks a silent one
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rlpt_fast.distributed.context import DEFAULT_TIMEOUT_S, DistContext, init_distributed
from rlpt_fast.distributed.fsdp import clip_grad_norm, gather_root, gathered_weights, shard_model
from rlpt_fast.distributed.memory import MemoryPlan, check_plan, measured_state, plan_memory
from rlpt_fast.distributed.reduce import all_true, reduce_metrics, sum_across
from rlpt_fast.distributed.replicate import average_gradients, broadcast_parameters
from rlpt_fast.distributed.sharding import prompts_per_rank, shard_indices


def kv_cache_bytes(engine) -> int:
    """Bytes of the engine's allocated KV cache (0 without an engine)."""
    cache = getattr(getattr(engine, "runner", None), "kv_cache", None)
    return 0 if cache is None else cache.numel() * cache.element_size()


class NullMonitor:
    """The monitor of ranks other than 0: logs nothing, draws no bar, writes no file."""

    def __init__(self, path: Path):
        self.path = path

    def resume_at(self, step: int) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> list:
        return []


class DataParallel:
    """device: the config's model.device ("auto" | "cpu" | "cuda"); timeout_s: every collective's."""

    def __init__(self, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
        self.ctx: DistContext = init_distributed(device, timeout_s)
        self.sharded = False  # FSDP full fine-tuning (set by wrap)
        self._plan: MemoryPlan | None = None

    @property
    def distributed(self) -> bool:
        return self.ctx.distributed

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    # ------------------------------------------------------------------ models
    def wrap(self, model: nn.Module, *, lora: bool) -> nn.Module:
        """Full FT: FSDP2 (build the optimizer afterwards). LoRA: adapters broadcast from rank 0."""
        if not self.distributed:
            return model
        if lora:
            broadcast_parameters([p for p in model.parameters() if p.requires_grad], self.ctx)
            return model
        self.sharded = True
        return shard_model(model, self.ctx)

    def wrap_reference(self, ref: nn.Module | None) -> nn.Module | None:
        """The frozen reference copy of full fine-tuning is sharded too (it would double memory)."""
        return shard_model(ref, self.ctx) if ref is not None and self.sharded else ref

    @contextmanager
    def gathered(self, model: nn.Module, engine=None):
        """Context for generation: full weights on every rank, released at exit. The gathered
        tensors are fresh allocations each time, so an engine's CUDA graphs are re-recorded."""
        if not self.sharded:
            yield model
            return
        with gathered_weights(model):
            if engine is not None:
                engine.recapture()  # a no-op without CUDA graphs
            yield model

    def before_forward(self, model: nn.Module | None) -> None:
        """Full FT: gather the root group before a training or reference forward (fsdp.gather_root;
        every rank calls this at the same points)."""
        gather_root(model)

    def memory_plan(self, model: nn.Module, engine) -> MemoryPlan:
        """The plan of this rank (printed at start); engine: its KV cache is counted as allocated."""
        self._plan = plan_memory(model, world_size=self.world_size, sharded=self.sharded,
                                 kv_cache_bytes=kv_cache_bytes(engine))
        return self._plan

    def memory_check(self, model: nn.Module, optimizer, engine, peak_mb: float) -> str:
        """The plan against what this rank holds after a step and the step's measured peak (on
        CUDA max_memory_allocated; on the CPU the peak RSS, which also holds the interpreter)."""
        plan = self._plan or self.memory_plan(model, engine)
        ok, lines = check_plan(plan, measured_state(model, optimizer, kv_cache_bytes(engine)),
                               int(peak_mb * 2**20))
        return "\n".join([f"memory check ({'as planned' if ok else 'OFF PLAN'}):"] + ["  " + x for x in lines])

    def fork_rng(self, seed: int) -> None:
        """After the model is built (every rank drew the same initial weights): ranks other than 0
        leave the shared torch stream, so their dropout masks differ from rank 0's and each other's
        (with one stream every rank drew the same masks, over different data). Rank 0 keeps the
        one-process stream. Checkpoints carry each rank's generator (state.py)."""
        if self.ctx.rank > 0:
            torch.manual_seed(seed * 1_000_003 + self.ctx.rank)

    # ------------------------------------------------------------------ data
    def my_indices(self, num_prompts: int, micro_batches: int) -> list[int]:
        """Indices into the step's global prompt list that this rank generates and trains on."""
        return shard_indices(num_prompts, self.world_size, self.ctx.rank, micro_batches)

    def local_micro_batch(self, prompts_per_step: int) -> int:
        """Prompts per micro-batch on this rank."""
        return prompts_per_rank(prompts_per_step, self.world_size)

    def advantages(self, rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
        """rlpt_kernels.group_advantages of this rank's rewards (whole groups). Per-group scaling
        is local; "batch" scaling needs every rank's rewards (equal counts by construction)."""
        from rlpt_kernels import group_advantages  # lazy: kernels import triton

        if scale != "batch" or not self.distributed:
            return group_advantages(rewards, group_size, scale=scale)
        parts = [torch.empty_like(rewards) for _ in range(self.world_size)]
        dist.all_gather(parts, rewards.contiguous())
        whole = group_advantages(torch.cat(parts), group_size, scale=scale)
        return whole.split(rewards.numel())[self.ctx.rank]

    # ------------------------------------------------------------------ the update
    def global_count(self, n: int) -> int:
        return round(sum_across(self.ctx, n))

    def loss_factor(self, loss_type: str, micro_batch_tokens: int) -> float:
        """Factor on this rank's micro-batch loss so that the MEAN of the ranks' gradients is the
        one-process gradient (see the module docstring; equal sequences per rank assumed)."""
        if not self.distributed or loss_type in ("grpo", "dr_grpo"):
            return 1.0
        if loss_type == "dapo":  # num_items_in_batch is already the global token count
            return float(self.world_size)
        if loss_type == "bnpo":
            total = sum_across(self.ctx, micro_batch_tokens)
            return self.world_size * micro_batch_tokens / max(total, 1.0)
        raise ValueError(f"loss_factor: unknown loss_type {loss_type!r}")

    def agree(self, flag: bool) -> bool:
        """True iff every rank says True (skip decisions must be unanimous, or ranks deadlock)."""
        return all_true(self.ctx, flag)

    def finish_backward(self, params: list[torch.Tensor]) -> None:
        """After the last backward of an update: LoRA adapters' gradients averaged over ranks
        (FSDP already reduce-scattered its gradients during backward)."""
        if self.distributed and not self.sharded:
            average_gradients(params, self.ctx)

    def clip(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Global gradient norm (same on every rank) after clipping to max_norm."""
        return clip_grad_norm(params, max_norm)

    # ------------------------------------------------------------------ reporting
    def reduce(self, metrics: dict, *, completions: int, groups: int) -> dict:
        return reduce_metrics(self.ctx, metrics, counts={"completions": completions, "groups": groups})

    def monitor(self, make, path: Path):
        """make(): the real Monitor on rank 0; a NullMonitor elsewhere."""
        return make() if self.is_main else NullMonitor(path)
