"""AdamW over the trainable parameters and the learning-rate schedule as a pure function.

The schedule is `lr_at(update)`, set on the optimizer before every update: nothing but the
update count is state, so a resumed run continues the curve exactly.
"""
from __future__ import annotations

import math

import torch

from rlpt_fast.train.config import OptimSection


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs that require grad, in module order (the checkpoint's key order)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimSection) -> torch.optim.AdamW:
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if cfg.fused == "false":
        return torch.optim.AdamW(params, **kwargs, foreach=True)
    try:
        return torch.optim.AdamW(params, **kwargs, fused=True)
    except (RuntimeError, ValueError):
        if cfg.fused == "true":
            raise
        return torch.optim.AdamW(params, **kwargs, foreach=True)  # fused unsupported for this device/dtype


def lr_at(update: int, total: int, cfg: OptimSection) -> float:
    """Learning rate of the update-th optimizer update (0-based) out of `total`:
    linear warm-up over warmup_steps, then linear decay to 0 / constant / cosine to 0 (Hugging Face's
    get_*_schedule_with_warmup)."""
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / (cfg.warmup_steps + 1) if cfg.warmup_steps else cfg.lr
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (update - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
