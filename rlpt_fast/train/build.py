"""What a Trainer is made of: the policy (LoRA or full fine-tuning), the reference, the engine's settings."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlpt_fast.model import load_model
from rlpt_fast.model.lora import LoRAConfig, apply_lora
from rlpt_fast.train.config import TrainConfig


def build_models(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, given: torch.nn.Module | None,
                 resume_from: Path | None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(policy in train mode, reference or None). LoRA: adapters on the configured Linears, all
    else frozen; the reference is the policy with its adapter disabled (None here). Full
    fine-tuning: everything outside the vision tower trains, from the checkpoint's weights when
    resuming; with beta > 0 a frozen copy of the initial weights is the reference."""
    full_ft = not cfg.lora.enabled
    path = str(resume_from / "model") if full_ft and resume_from is not None else cfg.model.path
    model = given if given is not None else load_model(path, dtype=dtype, device=device)
    on_cuda = model.device.type == "cuda"
    gc = cfg.model.gradient_checkpointing
    model.gradient_checkpointing = on_cuda if gc is None else gc
    ref = None
    if full_ft:
        for name, p in model.named_parameters():
            p.requires_grad_(".visual." not in f".{name}")
        if cfg.grpo.beta > 0:  # no adapter to switch off: a frozen copy of the initial weights
            ref = (copy.deepcopy(model) if given is not None else
                   load_model(cfg.model.path, dtype=model.dtype, device=model.device))
            ref.eval().requires_grad_(False)
    else:
        lc = cfg.lora
        apply_lora(model, LoRAConfig(lc.r, lc.alpha, lc.dropout, tuple(lc.target_modules) or None))
    return model.train(), ref


def engine_config(cfg: TrainConfig, model: torch.nn.Module) -> dict:
    """The [engine] table; on CUDA, unless it sizes the KV cache itself, the cache gets what one
    step needs (prompts up to max_model_len held once, G completions each, 25% slack) instead of
    most of the free memory, which the training forward needs."""
    g = cfg.grpo
    out = dict(cfg.engine)
    if model.device.type == "cuda" and not {"num_blocks", "kv_cache_bytes", "gpu_memory_utilization"} & set(out):
        prompts = cfg.train.prompts_per_step * cfg.train.grad_accum
        longest_prompt = out.get("max_model_len", 4096)
        tokens = prompts * (longest_prompt + g.num_generations * (g.max_new_tokens + 16))
        out["kv_cache_bytes"] = int(1.25 * tokens * model.kv_bytes_per_token())
    return out
