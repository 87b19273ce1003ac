"""Validated options of the GRPO loss, shared by the Triton path and the torch reference.

The four aggregations (RECIPE.md; TRL's GRPOTrainer names):
    grpo     mean over sequences of (sum of the sequence's masked token losses / its token count)
    bnpo     sum of masked token losses / number of masked tokens in the batch
    dr_grpo  sum of masked token losses / (B * max_completion_length)
    dapo     sum of masked token losses / num_items_in_batch (completion tokens of the whole
             accumulated batch; defaults to this batch's count)
KL estimators of KL(pi || ref) per token, with d = ref_logp - logp:
    k1 = -d,   k2 = d^2 / 2,   k3 = exp(d) - d - 1
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_TYPES = ("k1", "k2", "k3")


@dataclass(frozen=True)
class GRPOLossConfig:
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    temperature: float = 1.0
    kl: str = "k3"
    loss_type: str = "grpo"
    max_completion_length: int | None = None
    num_items_in_batch: float | None = None

    def __post_init__(self):
        if self.kl not in KL_TYPES:
            raise ValueError(f"kl must be one of {KL_TYPES}, got {self.kl!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"eps_low/eps_high must be >= 0, got {self.eps_low}/{self.eps_high}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")

    def uses_kl(self, ref_logp: torch.Tensor | None) -> bool:
        return self.beta != 0.0 and ref_logp is not None


def check_loss_inputs(name: str, token_ids: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, old_logp, ref_logp) -> None:
    """Shapes as documented in grpo_loss: token_ids/mask/old/ref (B, T), advantages (B,)."""
    if token_ids.dim() != 2:
        raise ValueError(f"{name}: token_ids must be (B, T), got shape {tuple(token_ids.shape)}")
    B, T = token_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"{name}: empty batch (token_ids has shape {tuple(token_ids.shape)})")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{name}: mask must have shape {(B, T)}, got {tuple(mask.shape)}")
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"{name}: advantages must have shape {(B,)}, got {tuple(advantages.shape)}")
    for label, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name}: {label} must have shape {(B, T)}, got {tuple(t.shape)}")


def check_logits(name: str, logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} and token_ids "
                         f"{tuple(token_ids.shape)} disagree on the leading dims")
    if logits.numel() == 0:
        raise ValueError(f"{name}: empty batch (logits has shape {tuple(logits.shape)})")


def check_rewards(rewards: torch.Tensor, group_size: int, scale: str) -> None:
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be group|batch|none, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"group_advantages: rewards must be a non-empty 1-D tensor, "
                         f"got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards do not split into groups "
                         f"of {group_size}")


def token_weights(mask: torch.Tensor, cfg: GRPOLossConfig) -> torch.Tensor:
    """Per-token weight w (B, T) float32 such that loss = sum(w * per_token_loss)."""
    m = (mask != 0).to(torch.float32)
    B, T = m.shape
    if cfg.loss_type == "grpo":
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / B
    if cfg.loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if cfg.loss_type == "dr_grpo":
        return m / (B * (cfg.max_completion_length or T))
    normalizer = cfg.num_items_in_batch if cfg.num_items_in_batch is not None else m.sum()
    return m / torch.as_tensor(normalizer, dtype=torch.float32, device=m.device).clamp(min=1.0)
