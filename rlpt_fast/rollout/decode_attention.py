"""Decode attention: one new query token per sequence against its cached keys/values.

    out[b, h] = softmax(scale * q[b, h] . K[b, :ctx_b, h // G]) @ V[b, :ctx_b, h // G]

where G = Hq / Hkv query heads share one KV head (grouped-query attention) and K[b, t] lives in
cache block block_tables[b, t // block_size] at offset t % block_size.

A decode step reads every cached K/V once, so it is bandwidth-bound. The Triton kernel gives each
(sequence, KV head) program all G query heads of that KV head, so each K/V tile is loaded once for
the whole group; long contexts are split into `num_splits` ranges handled by separate programs
(split-K, flash-decoding style) so that a small batch still fills the GPU, and a combine kernel
merges the partial results by their log-sum-exp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_N = 32  # context tokens per tile of the split passes (a tl.dot dimension: >= 16)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float, num_splits: int = 1, max_context: int | None = None) -> torch.Tensor:
    """q: (B, Hq, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D); block_tables: (B, W) int32
    (entries past a sequence's blocks are ignored); context_lens: (B,) int32, each >= 1.
    Returns (B, Hq, D) in q's dtype, computed in float32 (the Triton kernel multiplies in the
    cache's dtype with float32 accumulation, like flash-decoding). num_splits / max_context are ignored
    (same signature as the Triton version)."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    slots, valid = context_slots(block_tables, context_lens, k_cache.shape[1])
    return attend_slots(q, k_cache, v_cache, slots, valid, scale)


def context_slots(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slot of every context position: (slots (B, W*block_size) int64, valid (B, W*block_size) bool).

    Invalid positions point at the sequence's own first token (real, finite values): unused cache
    rows may hold anything, even NaN, and 0 * NaN would leak through the softmax weights."""
    t = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)
    slots = block_tables.long()[:, t // block_size] * block_size + t % block_size
    valid = t[None, :] < context_lens[:, None].long()
    return torch.where(valid, slots, slots[:, :1]), valid


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, block_size, Hkv, D), slots (X, T) int64 -> (X, T, Hkv, D).
    index_select on the flat rows: on the CPU markedly faster than advanced indexing."""
    flat = cache.view(-1, *cache.shape[2:])
    return flat.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[2:])


def attend_slots(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention over gathered context slots (see context_slots); computed in float32."""
    hq, hkv = q.shape[1], k_cache.shape[2]
    k = gather_slots(k_cache, slots).transpose(1, 2).float()                         # (B, Hkv, T, D)
    v = gather_slots(v_cache, slots).transpose(1, 2).float()
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale, enable_gqa=hq != hkv)      # (B, Hq, 1, D)
    return out[:, :, 0].to(q.dtype)


@triton.jit
def _attend(q, K, V, table, start, end, kvh, stride_kb, stride_ks, stride_kh,
            ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
            PAGE: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of q (ROWS, D), already scaled, over context tokens [start, end) of one block
    table (KV head kvh). Returns (out (ROWS, D) f32, lse (ROWS,) f32; -inf for an empty range)."""
    d = tl.arange(0, BLOCK_D)
    m = tl.full((ROWS,), -1e30, tl.float32)  # finite, so exp(m_old - m_new) never sees inf - inf
    l = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < end
        page = tl.load(table + t // PAGE, mask=valid, other=0).to(tl.int64)
        rows = page * stride_kb + (t % PAGE) * stride_ks + kvh * stride_kh        # (N,)
        kvmask = valid[:, None] & (d[None, :] < HEAD_DIM)
        k = tl.load(K + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        v = tl.load(V + rows[:, None] + d[None, :], mask=kvmask, other=0.0)
        # the dots run in the cache's dtype (bf16/fp16 tensor cores, fp32 accumulation); an fp32
        # cache uses exact fp32 dots (IEEE), not TF32
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")                    # (ROWS, N)
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(V.dtype.element_ty), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    nonempty = l > 0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _split_program(Q, K, V, table, O, Lse, b, kvh, split, first, ctx, scale, tokens_per_split,
                   stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_ob, stride_oh, stride_os,
                   stride_lb, stride_lh, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """One (row b, KV head kvh, split) program of the split pass: the G query heads of kvh over
    context tokens [first + split * tokens_per_split, + tokens_per_split) within [first, ctx) of
    the row's block table, into partial slot `split`."""
    start = first + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    qmask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
    q = (q.to(tl.float32) * scale).to(K.dtype.element_ty)                          # (G, D)
    out, lse = _attend(q, K, V, table, start, end, kvh, stride_kb, stride_ks, stride_kh,
                       BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, IEEE)
    tl.store(O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out, mask=qmask)
    tl.store(Lse + b * stride_lb + heads * stride_lh + split, lse, mask=g < GROUP)


@triton.jit
def _decode_split_kernel(Q, K, V, Tables, Lens, O, Lse, scale, tokens_per_split,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb,
                         stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    _split_program(Q, K, V, Tables + b * stride_tb, O, Lse, b, kvh, split, 0, tl.load(Lens + b).to(tl.int64),
                   scale, tokens_per_split, stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                   GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, IEEE)


@triton.jit
def _decode_combine_kernel(O_part, Lse, Out, num_splits, stride_pb, stride_ph, stride_ps,
                           stride_lb, stride_lh, stride_ob, stride_oh,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + s, mask=s < num_splits, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))                                   # empty splits weigh 0
    o = tl.load(O_part + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                mask=(s[:, None] < num_splits) & (d[None, :] < HEAD_DIM), other=0.0)
    # an empty split's o may be unwritten memory (NaN): select before multiplying, 0 * NaN is NaN
    out = tl.sum(tl.where(w[:, None] > 0, o, 0.0) * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, num_splits: int = 1, max_context: int | None = None) -> torch.Tensor:
    """Triton version of `decode_attention_reference` (same arguments). max_context bounds every
    context_lens entry (default: W * block_size, the block table's reach); the split length is
    derived from it on the host, so no device value is read and the call is CUDA-graph safe."""
    o_part, lse = decode_partials(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, max_context)
    return combine_partials(o_part, lse, q.dtype)


def decode_partials(q, k_cache, v_cache, block_tables, context_lens, scale: float, num_splits: int = 1,
                    max_context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The split pass alone: (o_part (B, Hq, num_splits, D) f32, lse (B, Hq, num_splits) f32)."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    per_split = split_length(max_context or block_tables.shape[1] * page, num_splits)
    o_part = torch.empty(b, hq, num_splits, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, num_splits, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(b, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse, scale, per_split,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), **split_constexprs(q, k_cache))
    return o_part, lse


def split_length(tokens: int, splits: int) -> int:
    """Tokens per split when `splits` programs cover `tokens`: a whole number of BLOCK_N tiles."""
    per_split = -(-tokens // splits)
    return -(-per_split // BLOCK_N) * BLOCK_N


def split_constexprs(q: torch.Tensor, k_cache: torch.Tensor) -> dict:
    """The constexprs of _split_program for q (B, Hq, D) against a (num_blocks, block_size, Hkv, D) cache."""
    group, d = q.shape[1] // k_cache.shape[2], q.shape[2]
    return {"GROUP": group, "BLOCK_G": max(16, triton.next_power_of_2(group)), "HEAD_DIM": d,
            "BLOCK_D": max(16, triton.next_power_of_2(d)), "BLOCK_N": BLOCK_N, "PAGE": k_cache.shape[1],
            "IEEE": k_cache.dtype == torch.float32}


def combine_partials(o_part: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge (B, Hq, S, D) partial outputs by their log-sum-exp -> (B, Hq, D) in dtype."""
    b, hq, splits, d = o_part.shape
    out = torch.empty(b, hq, d, device=o_part.device, dtype=dtype)
    _decode_combine_kernel[(b, hq)](
        o_part, lse, out, splits, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough (sequence, head, split) programs to fill the GPU twice, each split >= 256 tokens."""
    want = -(-2 * num_sms // max(1, batch * num_kv_heads))
    return max(1, min(want, max_context // 256, 32))


def _check(q, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q must be (B, Hq, D) and caches (num_blocks, block_size, Hkv, D); "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    if k_cache.shape[3] != d or hq % k_cache.shape[2]:
        raise ValueError(f"decode_attention: cache heads/dim {tuple(k_cache.shape[2:])} do not fit q heads/dim ({hq}, {d})")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(f"decode_attention: block_tables must be ({b}, W) and context_lens ({b},), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
