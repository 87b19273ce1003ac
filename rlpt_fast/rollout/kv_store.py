"""Writing new keys/values into the paged KV cache.

Cache layout (one layer): k_cache, v_cache of shape (num_blocks, block_size, Hkv, D), contiguous;
token slot s lives at block s // block_size, offset s % block_size, so with a contiguous cache
the flat row of slot s is simply s. Slot -1 means "do not store" (padding rows of a CUDA-graph
batch). Each token moves 2 * Hkv * D elements in and out: this is a pure copy, bandwidth-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def _check(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"store_kv: k and v must both be (N, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"store_kv: caches must be (num_blocks, block_size, {k.shape[1]}, {k.shape[2]}), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: k_cache and v_cache must be contiguous")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"store_kv: dtype of k/v ({k.dtype}) must match the cache ({k_cache.dtype})")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"store_kv: slot_mapping must be ({k.shape[0]},), got {tuple(slot_mapping.shape)}")
