"""Pure-torch references for every kernel in rlpt_kernels, with the same signatures.

They are the CPU backend (the trainer and the demo run on them without a GPU) and the oracle the
Triton kernels are tested against. They follow TRL's GRPOTrainer formulas line by line and
materialize full float32 logits: clear, not fast.
"""
from __future__ import annotations

import torch

from .config import (GRPOLossConfig, check_hidden, check_logits, check_loss_inputs, check_rewards,
                     check_temperature)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                   *, inplace_backward: bool = False) -> torch.Tensor:
    """log_softmax(logits / temperature)[..., token_ids] in float32 (float64 for float64 logits).

    logits (..., V) float, any strides; token_ids (...) integer dtype, ids < 0 give 0;
    temperature > 0.  inplace_backward is accepted for signature parity and ignored here.
    """
    del inplace_backward
    check_logits("token_logprobs", logits, token_ids)
    check_temperature("token_logprobs", temperature)
    logp = (_wide(logits) / temperature).log_softmax(-1)
    ids = token_ids.clamp(min=0).unsqueeze(-1)
    return logp.gather(-1, ids).squeeze(-1).masked_fill(token_ids < 0, 0.0)


def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor,
                               token_ids: torch.Tensor, temperature: float = 1.0,
                               *, chunk_size: int | None = None) -> torch.Tensor:
    """token_logprobs(hidden @ weight.T, token_ids, temperature): hidden (..., H) and weight
    (V, H) of one float dtype; chunk_size is accepted for signature parity and ignored."""
    del chunk_size
    check_hidden("token_logprobs_from_hidden", hidden, weight, token_ids)
    check_temperature("token_logprobs_from_hidden", temperature)
    return token_logprobs(hidden @ weight.t(), token_ids, temperature)


def grpo_loss(logits: torch.Tensor, token_ids: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, old_logp: torch.Tensor | None = None,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, temperature: float = 1.0, kl: str = "k3",
              loss_type: str = "grpo", max_completion_length: int | None = None,
              num_items_in_batch: float | None = None, inplace_backward: bool = False,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of TRL's GRPOTrainer (token-level importance sampling, no delta clip).

    Arguments as rlpt_kernels.grpo_loss.grpo_loss: logits (B, T, V), token_ids (B, T),
    advantages (B,), mask (B, T), old_logp / ref_logp (B, T) or None, beta, eps_low, eps_high,
    temperature, kl, loss_type, max_completion_length, num_items_in_batch; inplace_backward is
    accepted for signature parity and ignored.
    """
    del inplace_backward
    cfg = GRPOLossConfig(beta, eps_low, eps_high, temperature, kl, loss_type,
                         max_completion_length, num_items_in_batch)
    check_loss_inputs("grpo_loss", token_ids, advantages, mask, old_logp, ref_logp)
    logp = token_logprobs(logits, token_ids, temperature)
    return _grpo_from_logp(logp, advantages, mask, old_logp, ref_logp, cfg)


def grpo_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                          advantages: torch.Tensor, mask: torch.Tensor, *,
                          old_logp: torch.Tensor | None = None,
                          ref_logp: torch.Tensor | None = None, beta: float = 0.0,
                          eps_low: float = 0.2, eps_high: float = 0.2, temperature: float = 1.0,
                          kl: str = "k3", loss_type: str = "grpo",
                          max_completion_length: int | None = None,
                          num_items_in_batch: float | None = None,
                          chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """grpo_loss(hidden @ weight.T, ...): hidden (B, T, H) and weight (V, H) of one float dtype;
    other arguments (token_ids, advantages, mask, old_logp, ref_logp, beta, eps_low, eps_high,
    temperature, kl, loss_type, max_completion_length, num_items_in_batch) as grpo_loss;
    chunk_size is accepted for signature parity and ignored."""
    del chunk_size
    check_hidden("grpo_loss_from_hidden", hidden, weight, token_ids)
    return grpo_loss(hidden @ weight.t(), token_ids, advantages, mask, old_logp=old_logp,
                     ref_logp=ref_logp, beta=beta, eps_low=eps_low, eps_high=eps_high,
                     temperature=temperature, kl=kl, loss_type=loss_type,
                     max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (std + eps); std unbiased, of the group (scale "group") or of the whole
    batch ("batch"), or no division ("none").

    rewards (N,) any real dtype, N a multiple of group_size (a python int >= 1); float32 out
    (float64 for float64 rewards). A group whose rewards are all equal gets exactly zero advantages.
    """
    check_rewards(rewards, group_size, scale)
    r = _wide(rewards).reshape(-1, int(group_size))
    centered = r - r.mean(-1, keepdim=True)
    same = r.amax(-1, keepdim=True) == r.amin(-1, keepdim=True)
    if scale == "group":
        std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centered = centered / (std + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), device=r.device)
        centered = centered / (std + eps)
    return centered.masked_fill(same, 0.0).view(-1)


def _grpo_from_logp(logp, advantages, mask, old_logp, ref_logp, cfg: GRPOLossConfig):
    m = mask.bool()
    # Masked positions may hold -inf log-probs or garbage ids: zero them before any exp.
    logp = logp.masked_fill(~m, 0.0)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype).masked_fill(~m, 0.0)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - cfg.eps_low, 1 + cfg.eps_high)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    per_token_kl = torch.zeros_like(logp)
    if cfg.uses_kl(ref_logp):
        d = ref_logp.to(logp.dtype).masked_fill(~m, 0.0) - logp
        if cfg.kl == "k3":
            per_token_kl = torch.exp(d) - d - 1
        elif cfg.kl == "k2":
            per_token_kl = 0.5 * d * d
        else:
            per_token_kl = -d
        per_token_loss = per_token_loss + cfg.beta * per_token_kl
    mf = m.to(logp.dtype)
    loss = _aggregate(per_token_loss, mf, cfg)
    clipped = ((coef_1 < 1 - cfg.eps_low) & (adv < 0)) | ((coef_1 > 1 + cfg.eps_high) & (adv > 0))
    n = mf.sum().clamp(min=1.0)
    stats = {
        "kl": ((per_token_kl * mf).sum() / n).item(),
        "clip_ratio": ((clipped.to(mf.dtype) * mf).sum() / n).item(),
    }
    return loss, stats


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32: the reference never computes in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _aggregate(per_token_loss, mf, cfg: GRPOLossConfig) -> torch.Tensor:
    if cfg.loss_type == "grpo":
        return ((per_token_loss * mf).sum(-1) / mf.sum(-1).clamp(min=1.0)).mean()
    if cfg.loss_type == "bnpo":
        return (per_token_loss * mf).sum() / mf.sum().clamp(min=1.0)
    if cfg.loss_type == "dr_grpo":
        length = cfg.max_completion_length or per_token_loss.size(1)
        return (per_token_loss * mf).sum() / (per_token_loss.size(0) * length)
    items = mf.sum() if cfg.num_items_in_batch is None else mf.new_tensor(cfg.num_items_in_batch)
    return (per_token_loss * mf).sum() / items.clamp(min=1.0)


# ---- the decoder's small ops (rlpt_kernels.decode_ops): eager torch, the rounding the model has ----
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype): x (..., H), weight (H,)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x, weight, eps), residual + x): x, residual (..., H), weight (H,)."""
    stream = residual + x
    return rms_norm(stream, weight, eps), stream


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in their dtype: gate, up (..., I)."""
    return torch.nn.functional.silu(gate) * up


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           signed_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x * cos + x.roll(D/2, -1) * signed_sin for x = q (N, Hq, D) and k (N, Hk, D);
    cos, signed_sin (N, 1, D) (or (N, D)) from rlpt_fast's rope.rotary_tables."""
    n, d = q.shape[0], q.shape[-1]
    cos, signed_sin = cos.reshape(n, 1, d), signed_sin.reshape(n, 1, d)
    return tuple(x * cos + x.roll(d // 2, -1) * signed_sin for x in (q, k))
