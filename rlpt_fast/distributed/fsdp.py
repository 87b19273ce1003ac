"""Full fine-tuning across ranks with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Layout: each decoder block is one FSDP group (all-gathered before its forward, freed after, again
in backward; its gradients reduce-scattered); the root group holds the embeddings, the final norm
and lm_head (tied or not). The frozen vision tower is left out of every group (`ignored_params`):
it is replicated, has no gradients or optimizer state, and, crucially, no collective in its
forward, because ranks encode different numbers of images per step (their own prompts).

The root group is gathered explicitly (`gather_root`) before every training or reference
forward, not by FSDP's hooks: our model is driven through `embed` / `forward_hidden` /
`compute_logits`, never `forward`, and the root's weights are also read outside any of those
(lm_head by the fused loss, embed_tokens for a sampled image-pad token). Registering a method as
a root forward would also be wrong: FSDP reduce-scatters the root's gradients as soon as backward
reaches a grad-requiring input of a root forward (such image-pad embeddings are one), before the
embedding's own gradient is in, and ranks then disagree on the collective's size. Without root
hooks the root's gradients are reduced in FSDP's end-of-backward callback, when all are in.

Generation: the engine runs many forwards whose number differs by rank (data-dependent decode
lengths), so it must not meet a collective: `gathered_weights` all-gathers every group once per
step, one block at a time (so the transient buffer is one block), keeps them through generation
and reshards them before training.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

from rlpt_fast.distributed.context import DistContext

# torch.distributed.fsdp / .tensor / .checkpoint are imported where used: together they cost
# a few seconds of start-up that one-process runs should not pay.


def _is_fsdp(module: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def is_sharded(model: nn.Module) -> bool:
    return _is_fsdp(model)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.language_model.layers)


def shard_model(model: nn.Module, ctx: DistContext, *, reshard_after_forward: bool = True) -> nn.Module:
    """Applies FSDP2 in place (blocks, then the root); returns the model. Build the optimizer AFTER
    this, from model.parameters(): those are then the sharded DTensors. Alone: the model unchanged.
    reshard_after_forward=False keeps blocks gathered from forward to backward (faster, more memory)."""
    if not ctx.distributed:
        return model
    if is_sharded(model):
        raise ValueError("shard_model: the model is already sharded")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    model.to(ctx.device)
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, ignored_params=set(model.model.visual.parameters()))
    model._rlpt_reshard_after_forward = reshard_after_forward
    # FSDP makes the first group to run forward its root; a block must not claim it. One root
    # forward (embed, registered for this call only) settles it.
    register_fsdp_forward_method(model, "embed")
    with torch.no_grad():
        model.embed(torch.zeros(1, dtype=torch.long, device=ctx.device))
    del model.embed  # back to the plain method: no root hooks from now on (module docstring)
    model.reshard()  # register the sharded parameters again (the optimizer must hold those)
    return model


def gather_root(model: nn.Module | None) -> None:
    """Gather the root group (embeddings, final norm, head) of a sharded model; call it before each
    training or reference forward (FSDP frees it after each backward). Collective: every rank calls
    it at the same points. A no-op when it is gathered already, or the model is not sharded."""
    if model is not None and is_sharded(model):
        model.unshard()


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_fsdp(m)]


@contextmanager
def gathered_weights(model: nn.Module):
    """Within the block every parameter is the full, plain tensor on every rank (the engine's view;
    no collective runs inside). Gathered group by group on entry, resharded on exit. Collective:
    every rank enters together. A no-op for models that are not sharded (LoRA, one process)."""
    if not is_sharded(model):
        yield model
        return
    modules = _fsdp_modules(model)
    blocks = [m for m in modules if m is not model]
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        for m in modules:
            m.unshard()
        yield model
    finally:
        for m in blocks:
            m.set_reshard_after_forward(getattr(model, "_rlpt_reshard_after_forward", True), recurse=False)
        for m in modules:
            m.reshard()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """torch's clip_grad_norm_ for plain or sharded (DTensor) gradients; returns the global norm
    (the same on every rank). The norm of sharded gradients is completed across ranks first, so the
    clipping coefficient is the one a single process would use."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
    if hasattr(total, "full_tensor"):  # a DTensor: each rank holds its shards' part
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor on rank 0 ({} on the other ranks) under FSDP;
    the plain state dict otherwise. Collective when sharded: every rank calls it."""
    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class StateDictView(nn.Module):
    """A module whose state_dict() is a given dict: lets rlpt_fast.model.lora_io.save_merged write a
    Hugging Face directory from gathered tensors without a second model in memory."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._state


def save_hf_model(model: nn.Module, ctx: DistContext, base_checkpoint_dir, out_dir) -> None:
    """The whole model as a Hugging Face directory (as on one GPU), written by rank 0 only.
    Collective when sharded: every rank calls it."""
    from rlpt_fast.model.lora_io import save_merged

    state = full_state_dict(model)
    if ctx.is_main:
        save_merged(StateDictView(state) if is_sharded(model) else model, base_checkpoint_dir, out_dir)
