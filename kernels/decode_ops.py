"""The decoder's small ops in one launch each, for inference: add + RMSNorm, SiLU * up, rotary.

In eager torch a bf16 RMSNorm is ~7 kernels (cast, pow, mean, add, rsqrt, mul, cast, mul), the
residual add one more, rotary ~4 per tensor and SwiGLU's activation 2. A decode step at batch 128
reads a few hundred KB per op, so each op costs its launch (a few us even inside a CUDA graph),
not its bytes. Here each op is one kernel that reads its inputs once and writes its outputs once.

Rounding follows the eager bf16 code step by step (each eager op rounds its result to the tensor
dtype; we round at the same points), so the fused decoder matches the eager one up to the order
of the fp32 mean and ulp-level differences of exp/rsqrt:
    add_rms_norm:  r = round(x + res);  y = round(w * round(r * rsqrt(mean(r^2) + eps)))
    silu_mul:      y = round(round(silu(g)) * u)                (F.silu(g) * u)
    rotary:        y = round(round(x * cos) + round(roll(x, D/2) * signed_sin))
No autograd: the decoder calls these only when no gradient is needed (rlpt_fast.model.decoder).
Every function also takes fp32 (the CPU tests run them in Triton's interpreter, in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, Res, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, H, eps,
                     HAS_RES: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(Res + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(ResOut.dtype.element_ty)  # the residual stream is rounded to its dtype, as eager
        tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    # eager: .to(stream dtype), then * weight
    if HAS_RES:
        normed = (x * inv).to(ResOut.dtype.element_ty).to(tl.float32)
    else:
        normed = (x * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * normed).to(Out.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """t as (R, width) rows with a contiguous last dim (a view when t allows it)."""
    if t.shape[-1] != width:
        raise ValueError(f"{name}: last dim must be {width}, got shape {tuple(t.shape)}")
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm(x, residual, weight, eps):
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"rms_norm: weight must be ({h},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    xr = _rows("rms_norm x", x, h)
    rr = xr if residual is None else _rows("add_rms_norm residual", residual, h)
    if rr.shape != xr.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must match "
                         f"x {tuple(x.shape)}")
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(xr.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    res_out = out if residual is None else torch.empty(xr.shape, dtype=res_dtype, device=x.device)
    block = triton.next_power_of_2(h)
    if xr.shape[0]:
        _rms_norm_kernel[(xr.shape[0],)](
            xr, rr, weight.contiguous(), out, res_out, xr.stride(0), rr.stride(0), out.stride(0),
            res_out.stride(0), h, float(eps), HAS_RES=residual is not None, BLOCK_H=block,
            num_warps=min(max(block // 256, 1), 16))
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) normalised in fp32, as decoder.RMSNorm.

    x: (..., H) fp32/fp16/bf16, last dim contiguous or not (copied then). weight: (H,).
    eps: python float. Returns (..., H) in promote(weight.dtype, x.dtype), contiguous.
    """
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual, weight, eps), x + residual): a residual add and the next norm.

    x, residual: (..., H), same shape, fp32/fp16/bf16 (the sum is rounded to their promoted
    dtype, as `residual + x` is). weight: (H,). Returns (normed, new_residual), both contiguous,
    normed in promote(weight.dtype, new_residual.dtype).
    """
    return _norm(x, residual, weight, eps)


@triton.jit
def _silu_mul_kernel(Gate, Up, Out, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(Gate + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)  # F.silu rounds here
    tl.store(Out + row * n_cols + cols, (act * u).to(Out.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up: SwiGLU's activation, silu in fp32 rounded to the dtype, then the product.

    gate, up: (..., I), same shape and dtype (fp32/fp16/bf16), rows may be strided (e.g. halves of
    one gate_up output). Returns (..., I) contiguous in their dtype.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must have one shape and dtype")
    n = gate.shape[-1]
    g, u = _rows("silu_mul gate", gate, n), _rows("silu_mul up", up, n)
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    block = min(triton.next_power_of_2(n), 2048)
    if g.shape[0]:
        grid = (g.shape[0], triton.cdiv(n, block))
        _silu_mul_kernel[grid](g, u, out, g.stride(0), u.stride(0), n, BLOCK=block, num_warps=4)
    return out.view(gate.shape)


@triton.jit
def rotated_heads(X, stride_n, stride_h, row, heads, c, s, d, rolled, d_mask, BLOCK_HEADS: tl.constexpr):
    """Row `row` of X (N, heads, D) rotated: (BLOCK_HEADS, BLOCK_D) in X's dtype, and its mask.
    c, s: (1, BLOCK_D) fp32 cos / signed sin; d, rolled, d_mask: (1, BLOCK_D) from rotary_columns."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    mask = (h < heads) & d_mask
    base = X + row * stride_n + h * stride_h
    x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(base + rolled, mask=mask, other=0.0).to(tl.float32)
    a = (x * c).to(X.dtype.element_ty).to(tl.float32)
    b = (xr * s).to(X.dtype.element_ty).to(tl.float32)
    return (a + b).to(X.dtype.element_ty), mask


@triton.jit
def rotary_columns(Cos, Sin, row, stride_cn, stride_sn, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token `row`'s tables as (1, BLOCK_D) fp32 (c, s), with the column indices d, the rolled
    columns (x.roll(D/2)[d] = x[d - D/2 mod D] = x[d + D/2 mod D]) and the column mask."""
    d = tl.arange(0, BLOCK_D)[None, :]
    d_mask = d < HEAD_DIM
    rolled = (d + HEAD_DIM // 2) % HEAD_DIM
    c = tl.load(Cos + row * stride_cn + d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(Sin + row * stride_sn + d, mask=d_mask, other=0.0).to(tl.float32)
    return c, s, d, rolled, d_mask


@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, QOut, KOut, stride_qn, stride_qh, stride_kn, stride_kh, stride_cn,
                   stride_sn, HQ, HK, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c, s, d, rolled, d_mask = rotary_columns(Cos, Sin, row, stride_cn, stride_sn, HEAD_DIM, BLOCK_D)
    q, q_mask = rotated_heads(Q, stride_qn, stride_qh, row, HQ, c, s, d, rolled, d_mask, BLOCK_HQ)
    tl.store(QOut + (row * HQ + tl.arange(0, BLOCK_HQ)[:, None]) * HEAD_DIM + d, q, mask=q_mask)
    k, k_mask = rotated_heads(K, stride_kn, stride_kh, row, HK, c, s, d, rolled, d_mask, BLOCK_HK)
    tl.store(KOut + (row * HK + tl.arange(0, BLOCK_HK)[:, None]) * HEAD_DIM + d, k, mask=k_mask)


def _table(op: str, name: str, t: torch.Tensor, n: int, d: int) -> torch.Tensor:
    rows = t.reshape(n, d) if t.numel() == n * d else None
    if rows is None or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must be (N, 1, D) or (N, D) = ({n}, {d}), got {tuple(t.shape)}")
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope.apply_rotary_tables on q and k in one launch: x * cos + x.roll(D/2, -1) * signed_sin.

    q: (N, Hq, D), k: (N, Hk, D), one dtype, D even, head dim contiguous (token and head strides
    free: views of the projections' outputs are read in place). cos, signed_sin: (N, 1, D) or
    (N, D) from rope.rotary_tables. Returns new contiguous (q', k') in q's dtype.

    Out of place on purpose: q and k are views of Linear outputs that a LoRA wrapper or a forward
    hook may still hold, and a rotation in place would make apply_rotary_tables' callers' tensors
    change under them; a fresh output costs no extra bytes (the input is read once either way).
    """
    q, k, c, s, q_out, k_out = rotary_operands("rotary", q, k, cos, signed_sin)
    n, hq, d = q.shape
    if n:
        _rotary_kernel[(n,)](
            q, k, c, s, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), c.stride(0),
            s.stride(0), hq, k.shape[1], HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
            BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            num_warps=4)
    return q_out, k_out


def rotary_operands(op: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
    """rotary's arguments checked (errors name `op`) and laid out for a kernel: (q, k with a
    contiguous head dim, cos and signed_sin as (N, D) rows, empty contiguous q_out and k_out)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] \
            or q.shape[2] % 2 or k.dtype != q.dtype:
        raise ValueError(f"{op}: q (N, Hq, D) and k (N, Hk, D) with one even D and dtype, "
                         f"got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}")
    n, _, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    c, s = _table(op, "cos", cos, n, d), _table(op, "signed_sin", signed_sin, n, d)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    return q, k, c, s, q_out, k_out
