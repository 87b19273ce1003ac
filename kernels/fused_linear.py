"""Log-probs and the GRPO loss straight from the last hidden states and the lm_head weight.

The (tokens x vocab) logits never exist: tokens are processed in chunks of C rows, so only a
(C, V) block of logits lives at a time (C is chosen so that block stays under CHUNK_BYTES).
For the GRPO loss, whose output is a scalar, each chunk's gradient is computed in the forward
pass (Liger-Kernel's idea): logits_c = h_c @ W^T, then the row kernel turns logits_c into
d loss / d logits_c in place, then grad_h_c = dlogits_c @ W and grad_W += dlogits_c^T @ h_c.
That is the three matmuls of a plain lm_head forward+backward and nothing more; the backward
only scales the stored gradients by the incoming scalar. Masked tokens are dropped before any
matmul. token_logprobs_from_hidden returns a vector, so its backward recomputes each chunk's
logits (four matmuls in all) instead of storing them.
"""
from __future__ import annotations

import torch

from .config import GRPOLossConfig, check_hidden, check_loss_inputs, check_temperature
from .grpo_loss import flat_row_inputs, grpo_rows, stats_dict, summarize
from .row_softmax import logprob_grad
from .token_logprobs import token_logprobs_rows

CHUNK_BYTES = 512 << 20  # the live (C, V) logits block: 0.5 GiB


def chunk_rows(vocab: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, CHUNK_BYTES // (vocab * itemsize))


class _TokenLogprobsFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature, chunk):
        h = hidden.reshape(-1, hidden.shape[-1])
        ids = token_ids.reshape(-1).contiguous()
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logp)
        for s in range(0, h.shape[0], chunk):
            logp[s:s + chunk], lse[s:s + chunk] = token_logprobs_rows(
                h[s:s + chunk] @ weight.t(), ids[s:s + chunk], temperature)
        ctx.save_for_backward(h, weight, ids, lse)
        ctx.temperature, ctx.chunk, ctx.shape = temperature, chunk, hidden.shape
        return logp.view(token_ids.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        h, weight, ids, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        coef = grad_logp.reshape(-1).float().contiguous()
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            e = s + ctx.chunk
            logits = h[s:e] @ weight.t()
            logprob_grad(logits, ids[s:e], lse[s:e], coef[s:e], ctx.temperature, logits)
            if need_h:
                torch.mm(logits, weight, out=grad_h[s:e])
            if need_w:
                grad_w.addmm_(logits.t(), h[s:e])
        grad_h = grad_h.view(ctx.shape) if need_h else None
        return grad_h, grad_w, None, None, None


def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor,
                               token_ids: torch.Tensor, temperature: float = 1.0,
                               *, chunk_size: int | None = None) -> torch.Tensor:
    """token_logprobs(hidden @ weight.T, token_ids, temperature) without the full logits.

    hidden (..., H) and weight (V, H): one float dtype and device, any strides (hidden is
    flattened to (N, H), a copy only if its view cannot be).  token_ids (...) integer dtype, < 0
    ignored.  temperature: python float > 0.  Returns float32 log-probs, shape of token_ids;
    gradients flow to hidden and weight.  chunk_size: token rows per chunk, >= 1 (default: a
    0.5 GiB logits block).
    """
    check_hidden("token_logprobs_from_hidden", hidden, weight, token_ids)
    check_temperature("token_logprobs_from_hidden", temperature)
    chunk = chunk_rows(weight.shape[0], hidden.element_size(), chunk_size)
    return _TokenLogprobsFromHidden.apply(hidden, weight, token_ids, float(temperature), chunk)


class _GRPOLossFromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, rows, cfg, chunk):
        """hidden (N, H) active rows only; rows: per-row inputs (ids, adv, mask, w, old, ref)."""
        ids, adv, m, w, old, ref = rows
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        outs = []
        for s in range(0, hidden.shape[0], chunk):
            e = s + chunk
            logits = hidden[s:e] @ weight.t()
            part = [None if t is None else t[s:e] for t in (ids, adv, m, w, old, ref)]
            outs.append(grpo_rows(logits, *part, cfg, write_grad=need_h or need_w))
            if need_h:
                torch.mm(logits, weight, out=grad_h[s:e])
            if need_w:
                grad_w.addmm_(logits.t(), hidden[s:e])
        # With every token masked there is no chunk at all: zero loss and zero gradients.
        out = {k: torch.cat([o[k] for o in outs]) if outs else m.new_zeros(0)
               for k in ("loss", "kl", "clipped")}
        loss, stats = summarize(out, w, m)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def grpo_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                          advantages: torch.Tensor, mask: torch.Tensor, *,
                          old_logp: torch.Tensor | None = None,
                          ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                          eps_low: float = 0.2, eps_high: float = 0.2, temperature: float = 1.0,
                          kl: str = "k3", loss_type: str = "grpo",
                          max_completion_length: int | None = None,
                          num_items_in_batch: float | None = None,
                          chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """grpo_loss(hidden @ weight.T, ...) without the full logits; gradients for hidden and weight.

    hidden (B, T, H) last hidden states, hidden[b, t] predicting token_ids[b, t]; weight (V, H),
    same float dtype and device, any strides.  chunk_size: completion tokens per chunk, >= 1
    (default: a 0.5 GiB logits block).  Other arguments as grpo_loss (token_ids, advantages,
    mask, old_logp, ref_logp, beta, eps_low, eps_high, temperature, kl, loss_type,
    max_completion_length, num_items_in_batch).  The weight gradient accumulates in the weight's
    dtype across chunks (as Liger-Kernel does): an fp32 accumulator would cost V*H*4 bytes.
    """
    cfg = GRPOLossConfig(beta, eps_low, eps_high, float(temperature), kl, loss_type,
                         max_completion_length, num_items_in_batch)
    check_hidden("grpo_loss_from_hidden", hidden, weight, token_ids)
    check_loss_inputs("grpo_loss_from_hidden", token_ids, advantages, mask, old_logp, ref_logp)
    rows = flat_row_inputs(token_ids, advantages, mask, old_logp, ref_logp, cfg)
    h = hidden.reshape(-1, hidden.shape[-1])
    # Only completion tokens cost matmuls; the others contribute nothing to loss or gradient.
    keep = rows[2].nonzero().squeeze(1)
    if keep.numel() < h.shape[0]:
        rows = tuple(None if t is None else t.index_select(0, keep) for t in rows)
    else:
        keep = None
    h_active = h if keep is None else h.index_select(0, keep)
    chunk = chunk_rows(weight.shape[0], hidden.element_size(), chunk_size)
    loss, stats = _GRPOLossFromHidden.apply(h_active, weight, rows, cfg, chunk)
    return loss, stats_dict(stats)
