"""Data-parallel GRPO on PyTorch's own stack: torchrun, torch.distributed, FSDP2, DCP.

    ctx = init_distributed()                          # torchrun env; world size 1 when alone
    with fail_together(ctx):                          # one rank fails -> all stop, clearly
        mine = shard_prompts(picks, ctx.world_size, ctx.rank, micro_batches)   # whole groups
        model = shard_model(model, ctx)               # full FT: FSDP2 blocks + root
        gather_root(model)                            # before each training/reference forward
        # (LoRA: broadcast_parameters(adapters, ctx) once, average_gradients(adapters, ctx) per update)
        with gathered_weights(model):                 # engine on full weights, released after
            outs = engine.generate(...)
        ...backward...; clip_grad_norm(params, max_norm); optimizer.step()
        metrics = reduce_metrics(ctx, metrics, counts={"completions": n, "groups": g})
        save_sharded_state(dir, model, optimizer, ctx)   # DCP, resume at the same world size
        save_hf_model(model, ctx, base_dir, out_dir)     # HF directory from rank 0
    print(plan_memory(model, world_size=..., sharded=...).table())

Every function is a no-op (or the plain single-process behaviour) at world size 1.
"""
from rlpt_fast.distributed.context import DistContext, init_distributed, shutdown
from rlpt_fast.distributed.failure import RankFailedError, fail_together
from rlpt_fast.distributed.fsdp import (
    clip_grad_norm,
    full_state_dict,
    gather_root,
    gathered_weights,
    is_sharded,
    save_hf_model,
    shard_model,
)
from rlpt_fast.distributed.memory import MemoryPlan, check_plan, measured_state, plan_memory
from rlpt_fast.distributed.reduce import DEFAULT_RULES, Rule, all_true, reduce_metrics, sum_across
from rlpt_fast.distributed.replicate import average_gradients, broadcast_parameters
from rlpt_fast.distributed.sharding import (
    group_members,
    prompts_per_rank,
    shard_indices,
    shard_prompts,
)


def __getattr__(name: str):
    # lazy: torch.distributed.checkpoint (DCP) costs about a second to import, on every run
    if name in ("load_sharded_state", "save_sharded_state", "saved_world_size"):
        from rlpt_fast.distributed import state
        return getattr(state, name)
    raise AttributeError(f"module 'rlpt_fast.distributed' has no attribute {name!r}")

__all__ = [
    "DEFAULT_RULES", "DistContext", "MemoryPlan", "RankFailedError", "Rule", "all_true", "average_gradients",
    "broadcast_parameters", "check_plan", "clip_grad_norm", "fail_together", "full_state_dict",
    "gather_root", "gathered_weights", "group_members", "init_distributed", "is_sharded", "load_sharded_state",
    "measured_state", "plan_memory", "prompts_per_rank", "reduce_metrics", "save_hf_model",
    "save_sharded_state", "saved_world_size", "shard_indices", "shard_model", "shard_prompts", "shutdown",
    "sum_across",
]
