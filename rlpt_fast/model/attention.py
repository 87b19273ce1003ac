"""Reference attention over flat (concatenated) sequences, with torch SDPA.

The decoder never sees a batch dimension: tokens of several sequences are concatenated and the
attention function decides who attends to whom. `causal_attention(cu_seqlens)` is the dense causal
one (model.logits and parity tests use it); the engine passes a paged-KV one, training a packed one.

AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]:
    (layer_idx, q (N, Hq, D), k (N, Hkv, D), v (N, Hkv, D)) -> (N, Hq, D); q and k already rotated.
One whose attribute `fuses_rotary` is true also takes q and k unrotated with the keyword
`rotary=(cos, signed_sin)` (rope.rotary_tables' (N, 1, D) tensors) and rotates them itself: the
engine's paged attention does it in the launch that writes K/V into its cache. The decoder uses
that form only on its fused (gradient-free Triton) path.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_bounds(bounds: list[int], n: int) -> None:
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"cu_seqlens must rise from 0 to the token count {n}, got {bounds}")


def causal_attention(cu_seqlens: torch.Tensor) -> AttentionFn:
    """Dense causal attention within each of the S sequences delimited by cu_seqlens (S+1,).

    Sequences never see each other; GQA maps query head j to kv head j // (Hq / Hkv).
    One SDPA call per sequence: exact, and each call can use the fused causal kernel.
    """
    bounds = [int(x) for x in cu_seqlens.tolist()]

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _check_bounds(bounds, q.shape[0])
        outs = [sdpa(q[a:b], k[a:b], v[a:b], causal=True) for a, b in zip(bounds, bounds[1:]) if b > a]
        return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)

    return attn


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on one sequence in token-major layout: q (L, Hq, D), k/v (L, Hkv, D) -> (L, Hq, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, is_causal=causal,
        enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention within segments (vision: per image or per window).

    q/k/v (N, H, D); cu_seqlens (S+1,). Segments are padded into one (S, Lmax) batch so the many
    small windows of the Qwen2.5-VL tower cost one SDPA call, not S; padded keys are masked out and
    padded query rows dropped.
    """
    bounds = torch.as_tensor(cu_seqlens, device=q.device).long()
    lens = bounds[1:] - bounds[:-1]
    lmax = int(lens.max())
    if int(lens.min()) == lmax:  # equal segments: a plain reshape, no padding
        s = lens.numel()
        qb, kb, vb = (t.reshape(s, lmax, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb)
        return out.transpose(1, 2).reshape(q.shape)
    offs = torch.arange(lmax, device=q.device)
    valid = offs[None, :] < lens[:, None]  # (S, Lmax)
    idx = (bounds[:-1, None] + offs[None, :]).clamp(max=q.shape[0] - 1)
    qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # (S, H, Lmax, D)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[valid]  # (N, H, D), rows back in segment order
