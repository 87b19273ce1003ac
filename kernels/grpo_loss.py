"""grpo_loss: log-probs, clipped policy ratio, KL penalty and masking fused into one pass.

Per token (RECIPE.md, TRL's GRPOTrainer), with logp from the logits at temperature T:
    r        = exp(logp - old_logp)            (r = 1 with old_logp=None: on-policy)
    loss_t   = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t     = k1 | k2 | k3 of (ref_logp - logp)
    d loss_t / d logp = (0 if the clipped branch is the smaller, else -A * r) + beta * d kl_t
then loss = sum_t w_t * loss_t with the aggregation weights w of config.token_weights.

The forward kernel reads each logit once and writes six floats per token; the backward is the
shared row-gradient kernel with coef_t = grad * w_t * dloss_t/dlogp_t. Masked tokens are never
read: their row is skipped and every output is 0, so they cannot produce NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import GRPOLossConfig, check_logits, check_loss_inputs, token_weights
from .row_softmax import (block_config, bump_version, logprob_grad, row_layout, row_lse,
                          row_offset, target_logit, write_row_grad)

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _grpo_row_kernel(logits_ptr, T, stride_b, stride_t, ids_ptr, adv_ptr, mask_ptr, weight_ptr,
                     old_ptr, ref_ptr, loss_ptr, kl_ptr, clip_ptr, dlogp_ptr, lse_ptr,
                     V, inv_temp, beta, eps_low, eps_high,
                     HAS_OLD: tl.constexpr, USE_KL: tl.constexpr, KL_TYPE: tl.constexpr,
                     WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, T, stride_b, stride_t)
    m = tl.load(mask_ptr + row)
    active = m != 0.0
    target = tl.load(ids_ptr + row).to(tl.int64)
    zero = m * 0.0  # an fp32 scalar zero (mask is 0/1, never inf) typed for both if-branches
    lse = zero
    x_t = zero
    if active:
        lse = row_lse(row_ptr, V, inv_temp, BLOCK_V)
        x_t = target_logit(row_ptr, target, V, inv_temp)
    logp = tl.where(lse == -float("inf"), -float("inf"), x_t - lse)
    adv = tl.load(adv_ptr + row)
    ratio = zero + 1.0
    if HAS_OLD:
        ratio = tl.exp(logp - tl.load(old_ptr + row))
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    unclipped, clipped = ratio * adv, clipped_ratio * adv
    loss = -tl.minimum(unclipped, clipped)
    dlogp = tl.where(unclipped > clipped, 0.0, -adv * ratio)
    is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    kl = zero
    if USE_KL:
        d = tl.load(ref_ptr + row) - logp
        if KL_TYPE == 3:
            kl = tl.exp(d) - d - 1.0
            dkl = 1.0 - tl.exp(d)
        elif KL_TYPE == 2:
            kl = 0.5 * d * d
            dkl = -d
        else:
            kl = -d
            dkl = zero + 1.0
        loss += beta * kl
        dlogp += beta * dkl
    # Inactive rows read nothing; where() keeps their garbage (exp of unmasked olds) out.
    tl.store(loss_ptr + row, tl.where(active, loss, 0.0))
    tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
    tl.store(clip_ptr + row, tl.where(active & is_clipped, 1.0, 0.0))
    tl.store(dlogp_ptr + row, tl.where(active, dlogp, 0.0))
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        scale = tl.where(active, tl.load(weight_ptr + row) * dlogp, 0.0)
        write_row_grad(row_ptr, row_ptr, target, lse, scale, V, inv_temp, BLOCK_V)


def grpo_rows(rows: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              weight: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
              cfg: GRPOLossConfig, write_grad: bool) -> dict[str, torch.Tensor]:
    """Launcher over flat rows.

    rows: (..., V) logits of R rows in any row_layout; with write_grad=True they are overwritten by
    w_t * d loss_t / d logits (the gradient of the aggregated loss).  ids (R,) int;
    adv, mask, weight, old, ref: (R,) float32 contiguous (mask: 1.0 active, 0.0 skipped).
    Returns float32 (R,) tensors: loss, kl, clipped, dlogp, lse.
    """
    V = rows.shape[-1]
    R = rows.numel() // V
    out = {k: torch.empty(R, dtype=torch.float32, device=rows.device)
           for k in ("loss", "kl", "clipped", "dlogp", "lse")}
    use_kl = cfg.uses_kl(ref)
    block, warps = block_config(V)
    _grpo_row_kernel[(R,)](
        rows, *row_layout(rows), ids, adv, mask, weight,
        old if old is not None else adv, ref if use_kl else adv,
        out["loss"], out["kl"], out["clipped"], out["dlogp"], out["lse"],
        V, 1.0 / cfg.temperature, cfg.beta, cfg.eps_low, cfg.eps_high,
        HAS_OLD=old is not None, USE_KL=use_kl, KL_TYPE=KL_CODES[cfg.kl],
        WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=warps)
    return out


def flat_row_inputs(token_ids, advantages, mask, old_logp, ref_logp, cfg: GRPOLossConfig):
    """(B, T) inputs -> contiguous (B*T,) rows: ids, adv, mask, weight, old, ref."""
    T = token_ids.shape[1]
    f32 = dict(dtype=torch.float32)
    return (
        token_ids.reshape(-1).contiguous(),
        advantages.to(**f32).repeat_interleave(T).contiguous(),
        (mask != 0).reshape(-1).to(**f32).contiguous(),
        token_weights(mask, cfg).reshape(-1).contiguous(),
        None if old_logp is None else old_logp.reshape(-1).to(**f32).contiguous(),
        None if ref_logp is None else ref_logp.reshape(-1).to(**f32).contiguous(),
    )


def summarize(out: dict[str, torch.Tensor], weight: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, [mean kl, clip ratio]) from per-row outputs; the stats in one tensor (one sync)."""
    loss = (out["loss"] * weight).sum()
    n = mask.sum().clamp(min=1.0)
    stats = torch.stack([out["kl"].sum() / n, out["clipped"].sum() / n])
    return loss, stats


def stats_dict(stats: torch.Tensor) -> dict[str, float]:
    kl, clip = stats.tolist()
    return {"kl": kl, "clip_ratio": clip}


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_ids, advantages, mask, old_logp, ref_logp, cfg, inplace):
        # 3-D logits keep their batch and row strides (logits[:, :-1] is not copied), others flatten
        rows = logits if logits.dim() == 3 else logits.reshape(-1, logits.shape[-1])
        ids, adv, m, w, old, ref = flat_row_inputs(token_ids, advantages, mask, old_logp,
                                                   ref_logp, cfg)
        out = grpo_rows(rows, ids, adv, m, w, old, ref, cfg, write_grad=False)
        loss, stats = summarize(out, w, m)
        ctx.save_for_backward(rows, ids, out["lse"], w * out["dlogp"])
        ctx.temperature, ctx.inplace, ctx.shape = cfg.temperature, inplace, logits.shape
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        rows, ids, lse, coef = ctx.saved_tensors
        out = rows if ctx.inplace else torch.empty_like(rows)
        logprob_grad(rows, ids, lse, (coef * grad_loss).contiguous(), ctx.temperature, out)
        if ctx.inplace:
            bump_version(rows)
        return out.view(ctx.shape), None, None, None, None, None, None, None


def grpo_loss(logits: torch.Tensor, token_ids: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, old_logp: torch.Tensor | None = None,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, temperature: float = 1.0, kl: str = "k3",
              loss_type: str = "grpo", max_completion_length: int | None = None,
              num_items_in_batch: float | None = None, inplace_backward: bool = False,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss from logits, fused; the same values as TRL's GRPOTrainer.

    logits (B, T, V) fp32/fp16/bf16 with contiguous vocab dim (batch and token strides free:
    logits[:, :-1] is read in place); logits[b, t] predicts token_ids[b, t] (callers shift).
    token_ids (B, T) integer dtype, in [0, V) where mask is set (not checked: that would cost a
    device sync).  advantages (B,) float.  mask (B, T) bool/int/float, nonzero = completion token
    (masked positions are never read).
    old_logp / ref_logp (B, T) float or None (None old = on-policy, ratio 1; None ref or beta 0 =
    no KL).  All on logits' device; the (B, T) and (B,) tensors may have any strides (they are
    copied into contiguous float32 rows).
    beta >= 0: KL weight.  eps_low, eps_high >= 0: the ratio is clipped to [1 - eps_low,
    1 + eps_high].  temperature > 0 divides the logits.  kl: "k1" | "k2" | "k3" (config.py).
    loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (config.py); max_completion_length >= 1
    (default T) is dr_grpo's normalizer, num_items_in_batch (default: this batch's mask count)
    dapo's.  Returns (scalar float32 loss, {"kl": masked mean KL, "clip_ratio": ...}).
    inplace_backward=True writes the logits gradient into the logits' storage.
    """
    cfg = GRPOLossConfig(beta, eps_low, eps_high, float(temperature), kl, loss_type,
                         max_completion_length, num_items_in_batch)
    check_logits("grpo_loss", logits, token_ids)
    check_loss_inputs("grpo_loss", token_ids, advantages, mask, old_logp, ref_logp)
    loss, stats = _GRPOLoss.apply(logits, token_ids, advantages, mask, old_logp, ref_logp, cfg,
                                  inplace_backward)
    return loss, stats_dict(stats)
