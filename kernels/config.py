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

import numbers
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
    check_token_ids(name, token_ids)
    check_devices(name, ("token_ids", token_ids), ("advantages", advantages), ("mask", mask),
                  ("old_logp", old_logp), ("ref_logp", ref_logp))


def check_logits(name: str, logits: torch.Tensor, token_ids: torch.Tensor) -> None:
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} and token_ids "
                         f"{tuple(token_ids.shape)} disagree on the leading dims")
    if logits.numel() == 0:
        raise ValueError(f"{name}: empty batch (logits has shape {tuple(logits.shape)})")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{name}: logits must be floating point, got {logits.dtype}")
    check_token_ids(name, token_ids)
    check_devices(name, ("logits", logits), ("token_ids", token_ids))


def check_hidden(name: str, hidden: torch.Tensor, weight: torch.Tensor,
                 token_ids: torch.Tensor) -> None:
    """hidden (..., H) float, weight (V, H) of hidden's dtype and device, token_ids (...) int."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: weight must be (V, H={hidden.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if hidden.shape[:-1] != token_ids.shape:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} and token_ids "
                         f"{tuple(token_ids.shape)} disagree on the leading dims")
    if hidden.numel() == 0:
        raise ValueError(f"{name}: empty batch (hidden has shape {tuple(hidden.shape)})")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"{name}: hidden must be floating point, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: weight has dtype {weight.dtype}, "
                         f"expected hidden's dtype {hidden.dtype}")
    check_token_ids(name, token_ids)
    check_devices(name, ("hidden", hidden), ("weight", weight), ("token_ids", token_ids))


def check_token_ids(name: str, token_ids: torch.Tensor) -> None:
    # The kernels would truncate float ids to int without a word; bool ids are a mask passed by
    # mistake.
    dtype = token_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"{name}: token_ids must hold integers, got {dtype}")


def check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:  # also NaN
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")


def check_devices(name: str, first: tuple[str, torch.Tensor],
                  *others: tuple[str, torch.Tensor | None]) -> None:
    """Every tensor (None skipped) on the first one's device: a kernel given a pointer to another
    device's memory fails far from the cause, or reads garbage."""
    label, device = first[0], first[1].device
    for other, t in others:
        if t is not None and t.device != device:
            raise ValueError(f"{name}: {other} is on {t.device}, {label} on {device}")


def check_rewards(rewards: torch.Tensor, group_size: int, scale: str) -> None:
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be group|batch|none, got {scale!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) \
            or group_size < 1:
        raise ValueError(f"group_advantages: group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"group_advantages: rewards must be a non-empty 1-D tensor, "
                         f"got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
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
