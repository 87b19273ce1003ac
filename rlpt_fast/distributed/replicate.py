"""LoRA across ranks: the frozen base replicated, only the adapter gradients averaged.

Each rank loads the same base checkpoint (identical frozen weights), and the adapters are
broadcast from rank 0 once so every replica starts from the same values. After the backward
passes of an update (all micro-batches), `average_gradients` all-reduces the trainable gradients in
flat buckets, one collective per bucket per update (not one per micro-batch as DDP without no_sync
would). The frozen base never moves between ranks: LoRA's traffic is the adapter's size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from rlpt_fast.distributed.context import DistContext

BUCKET_BYTES = 256 << 20


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices grouped into runs of one dtype and device, each at most bucket_bytes (or one tensor)."""
    out: list[list[int]] = []
    size, key = 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if not out or (t.dtype, t.device) != key or size + nbytes > bucket_bytes:
            out.append([])
            size, key = 0, (t.dtype, t.device)
        out[-1].append(i)
        size += nbytes
    return out


def broadcast_parameters(params: list[torch.Tensor], ctx: DistContext, src: int = 0,
                         bucket_bytes: int = BUCKET_BYTES) -> None:
    """Copies rank `src`'s values of `params` to every rank (in place)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for idx in _buckets(params, bucket_bytes):
            flat = _flatten_dense_tensors([params[i].detach() for i in idx])
            dist.broadcast(flat, src=src)
            for i, part in zip(idx, _unflatten_dense_tensors(flat, [params[i] for i in idx])):
                params[i].copy_(part)


def average_gradients(params: list[torch.Tensor], ctx: DistContext, bucket_bytes: int = BUCKET_BYTES) -> None:
    """grad <- mean over ranks of grad, for every parameter in `params` (a missing grad counts as
    zeros, so ranks always send buckets of the same layout). Call after the last backward of an
    update and before clipping."""
    if not ctx.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    for idx in _buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors([grads[i] for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
        flat.div_(ctx.world_size)
        for i, part in zip(idx, _unflatten_dense_tensors(flat, [grads[i] for i in idx])):
            grads[i].copy_(part)
