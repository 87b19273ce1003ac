"""Writing new keys/values into the paged KV cache.

Cache layout (one layer): k_cache, v_cache of shape (num_blocks, block_size, Hkv, D), contiguous;
token slot s lives at block s // block_size, offset s % block_size, so with a contiguous cache
the flat row of slot s is simply s. Slot -1 means "do not store" (padding rows of a CUDA-graph
batch). Each token moves 2 * Hkv * D elements in and out: this is a pure copy, bandwidth-bound.

`rotary_store_kv` also applies the rotary embedding to q and k in the same launch (vLLM fuses
these too): the decode step at batch 64-128 is launch-bound, and the rotation reads the k it
then stores, so the two together cost one kernel per layer instead of two.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlpt_kernels import reference
from rlpt_kernels.decode_ops import rotary_columns, rotary_operands, rotated_heads


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """k, v: (N, Hkv, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D) contiguous, same dtype
    as k/v; slot_mapping: (N,) int32/int64, -1 skips the row. Writes in place."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


@triton.jit
def _store_kv_kernel(K, V, K_cache, V_cache, Slots, stride_kn, stride_vn,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = (offs < ROW) & (slot >= 0)
    k = tl.load(K + i * stride_kn + offs, mask=mask)
    v = tl.load(V + i * stride_vn + offs, mask=mask)
    tl.store(K_cache + slot * ROW + offs, k, mask=mask)
    tl.store(V_cache + slot * ROW + offs, v, mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton version of `store_kv_reference` (same arguments). No host sync: CUDA-graph safe.
    k and v are read in place when each token's (Hkv, D) block is contiguous (the token stride is
    free: v is a column slice of the packed q/k/v GEMM's output), else copied first."""
    _check(k, v, k_cache, v_cache, slot_mapping)
    n, hkv, d = k.shape
    if n == 0:
        return
    k, v = _token_rows(k), _token_rows(v)
    row = hkv * d
    _store_kv_kernel[(n,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=triton.next_power_of_2(row))


def rotary_store_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                              signed_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rlpt_kernels.rotary on q and k, then store_kv of the rotated k and v; returns (q', k').
    q (N, Hq, D), k and v (N, Hkv, D), one dtype; cos, signed_sin (N, 1, D) or (N, D) from
    rope.rotary_tables; caches and slot_mapping as for store_kv_reference."""
    q, k = reference.rotary(q, k, cos, signed_sin)
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q, k


@triton.jit
def _rotary_store_kv_kernel(Q, K, V, Cos, Sin, QOut, KOut, K_cache, V_cache, Slots,
                            stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_cn, stride_sn,
                            HQ, HK, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + row).to(tl.int64)
    c, s, d, rolled, d_mask = rotary_columns(Cos, Sin, row, stride_cn, stride_sn, HEAD_DIM, BLOCK_D)
    q, q_mask = rotated_heads(Q, stride_qn, stride_qh, row, HQ, c, s, d, rolled, d_mask, BLOCK_HQ)
    tl.store(QOut + (row * HQ + tl.arange(0, BLOCK_HQ)[:, None]) * HEAD_DIM + d, q, mask=q_mask)
    k, k_mask = rotated_heads(K, stride_kn, stride_kh, row, HK, c, s, d, rolled, d_mask, BLOCK_HK)
    h = tl.arange(0, BLOCK_HK)[:, None]
    tl.store(KOut + (row * HK + h) * HEAD_DIM + d, k, mask=k_mask)
    cached = slot * HK * HEAD_DIM + h * HEAD_DIM + d  # (slot, h, d) of the contiguous cache
    store = k_mask & (slot >= 0)
    tl.store(K_cache + cached, k, mask=store)
    tl.store(V_cache + cached, tl.load(V + row * stride_vn + h * HEAD_DIM + d, mask=store), mask=store)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rotary_store_kv_reference` (same arguments), one launch: new contiguous
    (q', k') as rlpt_kernels.rotary returns them, and k' and v written into the cache at
    slot_mapping (-1 skips the row). Token and head strides of q/k are free; v is read in place
    when each token's (Hkv, D) block is contiguous. No host sync: CUDA-graph safe."""
    _check(k, v, k_cache, v_cache, slot_mapping, op="rotary_store_kv")
    q, k, c, s, q_out, k_out = rotary_operands("rotary_store_kv", q, k, cos, signed_sin)
    n, hq, d = q.shape
    if n:
        v = _token_rows(v)
        _rotary_store_kv_kernel[(n,)](
            q, k, v, c, s, q_out, k_out, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), c.stride(0), s.stride(0), hq, k.shape[1],
            HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), num_warps=4)
    return q_out, k_out


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def _check(k, v, k_cache, v_cache, slot_mapping, op: str = "store_kv") -> None:
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"{op}: k and v must both be (N, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"{op}: caches must be (num_blocks, block_size, {k.shape[1]}, {k.shape[2]}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{op}: k_cache and v_cache must be contiguous")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"{op}: dtype of k/v ({k.dtype}) must match the cache ({k_cache.dtype})")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"{op}: slot_mapping must be ({k.shape[0]},), got {tuple(slot_mapping.shape)}")
