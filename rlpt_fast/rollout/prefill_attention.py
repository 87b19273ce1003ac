"""Prefill attention: a chunk of new tokens per sequence against that sequence's whole context.

Sequence i contributes q_i = the queries of its tokens [c_i, c_i + n_i) (c_i already cached, or
shared with its group through the block table). Its keys/values are the cache rows of positions
[0, c_i + n_i), the new ones included (they are stored before attention runs). The mask is causal,
aligned bottom-right (query j sees keys 0 .. c_i + j):

        keys ->  0 1 2 3 4 5      c_i = 3, n_i = 3
    query 0      x x x x . .
    query 1      x x x x x .
    query 2      x x x x x x

Torch (gather + SDPA) on every device: prefill is compute-bound and SDPA is a good kernel; when a
sequence has nothing cached, its own k/v are used directly (no gather).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillMeta:
    """Per sequence of a prefill batch (host lists; tensors on the cache's device).

    cu_q: (S+1,) int64 offsets of each sequence's new tokens in the flat batch (host list).
    num_cached: tokens already in the cache before this chunk (host list).
    slots: per sequence, LongTensor (c_i + n_i,) of cache slots of its whole context.
    """
    cu_q: list[int]
    num_cached: list[int]
    slots: list[torch.Tensor]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: PrefillMeta, scale: float) -> torch.Tensor:
    """q: (N, Hq, D); k, v: (N, Hkv, D) of the new tokens; caches (num_blocks, block_size, Hkv, D)
    already holding the new tokens. Returns (N, Hq, D) in q's dtype."""
    out = torch.empty_like(q)
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    for i, cached in enumerate(meta.num_cached):
        lo, hi = meta.cu_q[i], meta.cu_q[i + 1]
        if cached == 0:
            ki, vi = k[lo:hi], v[lo:hi]
        else:
            ki = k_cache.view(-1, hkv, d)[meta.slots[i]]                   # (ctx, Hkv, D)
            vi = v_cache.view(-1, hkv, d)[meta.slots[i]]
        out[lo:hi] = dense_attention(q[lo:hi], ki, vi, scale)
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (n, Hq, D) the LAST n positions of a context whose keys/values are k, v: (ctx, Hkv, D)."""
    n, ctx = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)          # (H, T, D)
    if n == ctx:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1)
