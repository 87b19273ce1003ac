"""token_logprobs: log-softmax at the chosen token, in one pass over the vocabulary.

Naive torch does log_softmax (reads V, writes V in fp32), then gather: for bf16 logits that moves
2 + 4 + 4 bytes per element. This kernel reads each logit once (2 bytes in bf16) and writes one
float per token; the backward reads the logits once more and writes the gradient once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import check_logits, check_temperature
from .row_softmax import (block_config, bump_version, logprob_grad, row_layout, row_lse, row_offset,
                          target_logit)


@triton.jit
def _token_logprobs_fwd_kernel(logits_ptr, T, stride_b, stride_t, ids_ptr, logp_ptr, lse_ptr, V,
                               inv_temp, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, T, stride_b, stride_t)
    target = tl.load(ids_ptr + row).to(tl.int64)
    lse = row_lse(row_ptr, V, inv_temp, BLOCK_V)
    x_t = target_logit(row_ptr, target, V, inv_temp)
    logp = tl.where(lse == -float("inf"), -float("inf"), x_t - lse)
    tl.store(logp_ptr + row, tl.where(target >= 0, logp, 0.0))
    tl.store(lse_ptr + row, lse)


def token_logprobs_rows(logits: torch.Tensor, token_ids: torch.Tensor,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. logits (..., V) of R rows in any row_layout; token_ids (R,). Returns (logp, lse)
    fp32, (R,) each."""
    V = logits.shape[-1]
    R = logits.numel() // V
    ids = token_ids.contiguous()
    logp = torch.empty(R, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    block, warps = block_config(V)
    _token_logprobs_fwd_kernel[(R,)](logits, *row_layout(logits), ids, logp, lse, V,
                                     1.0 / temperature, BLOCK_V=block, num_warps=warps)
    return logp, lse


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_ids, temperature, inplace_backward):
        # 3-D logits keep their batch and row strides (logits[:, :-1] is not copied), others flatten
        rows = logits if logits.dim() == 3 else logits.reshape(-1, logits.shape[-1])
        ids = token_ids.reshape(-1)
        logp, lse = token_logprobs_rows(rows, ids, temperature)
        ctx.save_for_backward(rows, ids, lse)
        ctx.temperature, ctx.inplace, ctx.shape = temperature, inplace_backward, logits.shape
        return logp.view(token_ids.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        rows, ids, lse = ctx.saved_tensors
        out = rows if ctx.inplace else torch.empty_like(rows)
        coef = grad_logp.reshape(-1).float().contiguous()
        logprob_grad(rows, ids.contiguous(), lse, coef, ctx.temperature, out)
        if ctx.inplace:
            bump_version(rows)
        return out.view(ctx.shape), None, None, None


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                   *, inplace_backward: bool = False) -> torch.Tensor:
    """log_softmax(logits / temperature) at token_ids, float32, shape of token_ids.

    logits: (..., V) fp32/fp16/bf16 (fp64 is computed in fp32), vocab dim contiguous (other
    strides free up to 3-D; a 4-D or more view that cannot flatten is copied).  token_ids: (...)
    integer dtype, any layout, on logits' device; ids < 0 are ignored (log-prob 0, no gradient),
    ids >= V are not checked (that would cost a device sync) and give garbage.  A row of all -inf
    logits gives -inf.  temperature: python float > 0; logits are divided by it.
    inplace_backward=True writes the logits gradient into the logits' own storage (saving one
    (N, V) buffer); only use it when nothing else needs those logits after this loss.
    """
    check_logits("token_logprobs", logits, token_ids)
    check_temperature("token_logprobs", temperature)
    return _TokenLogprobs.apply(logits, token_ids, float(temperature), inplace_backward)
