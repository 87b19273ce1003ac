"""Row-wise pieces shared by every log-prob kernel: the online log-sum-exp and the gradient.

A "row" is one token's logits over the vocabulary, x = logits[row, :] / T. The forward pass reads
the row once, keeping a running maximum m (one scalar per block step) and per-lane sums
s = sum(exp(x - m)) rescaled whenever m grows, so it needs one exp per element and never holds
more than one block of the row in registers. The backward of logp = x[id] - lse(x) is

    d logp / d logits[v] = (1[v == id] - softmax(x)[v]) / T

so the gradient kernel re-reads the row once and writes it once, given the saved lse.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows are long (151,936 for Qwen): a large block keeps many loads in flight per program.
MAX_BLOCK_V = 4096


def row_layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(T, stride_b, stride_t): row r of t's (..., V) rows starts at (r // T) * stride_b +
    (r % T) * stride_t. Flattenable tensors are one block of rows (T = R); a 3-D tensor that is
    not, such as logits[:, :-1] of a (B, T + 1, V) tensor, keeps its two strides: no copy.
    Anything else needs .contiguous() first (ValueError)."""
    if t.stride(-1) != 1:
        raise ValueError(f"logits need a contiguous vocab dim, got strides {t.stride()}")
    rows = t.numel() // t.shape[-1]
    try:
        return rows, 0, t.view(rows, t.shape[-1]).stride(0)
    except RuntimeError:
        pass
    if t.dim() == 3:
        return t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"logits of shape {tuple(t.shape)} and strides {t.stride()} are neither "
                     f"flattenable nor 3-D: pass .contiguous()")


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """Element offset of row `row` (int64) in a row_layout."""
    return (row // T) * stride_b + (row % T) * stride_t


def block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary size."""
    block = min(MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return block, 8 if block >= 2048 else 4


@triton.jit
def row_lse(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
    """log(sum(exp(x))) of one row, x = row * inv_temp in fp32; -inf if the whole row is -inf."""
    m = -float("inf")
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 0))
        # With every value so far at -inf, exp(-inf - -inf) would be NaN: shift by 0 instead.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    shift = tl.where(m == -float("inf"), 0.0, m)
    return shift + tl.log(tl.sum(s, 0))


@triton.jit
def target_logit(row_ptr, target, V, inv_temp):
    """x[target] in fp32, or 0 for an ignored (negative) target."""
    valid = (target >= 0) & (target < V)
    return tl.load(row_ptr + tl.where(valid, target, 0), mask=valid, other=0.0).to(tl.float32) * inv_temp


@triton.jit
def write_row_grad(row_ptr, grad_row_ptr, target, lse, scale, V, inv_temp, BLOCK_V: tl.constexpr):
    """grad[v] = scale * (1[v == target] - exp(x[v] - lse)) * inv_temp for one row.

    grad_row_ptr may equal row_ptr (in place): each block is read before it is written.
    """
    # A row of all -inf has lse = -inf; its softmax is taken as 0 rather than NaN.
    lse = tl.where(lse == -float("inf"), float("inf"), lse)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        if scale == 0.0:
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
        else:
            x = tl.load(row_ptr + cols, mask=in_row, other=-float("inf")).to(tl.float32) * inv_temp
            p = tl.exp(x - lse)
            g = (tl.where(cols == target, 1.0, 0.0) - p) * (scale * inv_temp)
        tl.store(grad_row_ptr + cols, g.to(grad_row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _logprob_grad_kernel(logits_ptr, T, stride_b, stride_t, grad_ptr, grad_T, grad_stride_b,
                         grad_stride_t, ids_ptr, lse_ptr, coef_ptr, V, inv_temp,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(ids_ptr + row).to(tl.int64)
    scale = tl.where(target >= 0, tl.load(coef_ptr + row), 0.0)
    write_row_grad(logits_ptr + row_offset(row, T, stride_b, stride_t),
                   grad_ptr + row_offset(row, grad_T, grad_stride_b, grad_stride_t), target,
                   tl.load(lse_ptr + row), scale, V, inv_temp, BLOCK_V)


def logprob_grad(logits: torch.Tensor, token_ids: torch.Tensor, lse: torch.Tensor,
                 coef: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """Writes coef[r] * d logp[r] / d logits[r, :] into out (which may alias logits).

    logits, out: (..., V) of R rows in any row_layout, any float dtype.  token_ids: (R,) int,
    < 0 ignored.  lse, coef: (R,) float32 contiguous.  Returns out.
    """
    V = logits.shape[-1]
    R = logits.numel() // V
    assert lse.is_contiguous() and coef.is_contiguous() and token_ids.is_contiguous()
    block, warps = block_config(V)
    _logprob_grad_kernel[(R,)](logits, *row_layout(logits), out, *row_layout(out), token_ids, lse,
                               coef, V, 1.0 / temperature, BLOCK_V=block, num_warps=warps)
    return out


def bump_version(t: torch.Tensor) -> None:
    """Tell autograd that a kernel wrote into t behind its back (in-place backward)."""
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        increment(t)
