"""TrainConfig: every setting of a GRPO run, as nested dataclasses validated in __post_init__.

Loaded from TOML by `load_config(path, overrides)` (config_file.py), one table per section:

    [model]  path, dtype, device, gradient_checkpointing
    [lora]   enabled, r, alpha, dropout, target_modules        (enabled=false: full fine-tuning)
    [data]   files, task_mix, skip_invalid, shuffle, prompt_layout
    [grpo]   num_generations, beta, kl, eps_low, eps_high, loss_type, mu, scale_rewards,
             max_new_tokens, temperature, top_p, top_k, reward_compat, reward_fn
    [optim]  lr, schedule, warmup_steps, weight_decay, betas, adam_eps, max_grad_norm, fused
    [train]  prompts_per_step, grad_accum, epochs, max_steps, seed, output_dir,
             checkpoint_every, save_merged, max_nonfinite, progress, plots, tensorboard
    [engine] any field of rlpt_fast.rollout.EngineConfig

Overrides are `--section.key=value` (or `--key=value` when the key name is unique across
sections); values are parsed as TOML values, falling back to a bare string. Unknown sections and
keys are errors that name them. The defaults reproduce RePIC's run (RECIPE.md): LoRA r64 /
alpha 128 / dropout 0.05 on every Linear outside the vision tower (lm_head included), G = 8,
beta 0.04 with k3, eps 0.2 / 0.2, "grpo" aggregation, mu = 1, AdamW lr 1e-5 with linear decay,
2 prompts per step, 256 new tokens, temperature 1, top-p 1, 2 epochs, RePIC-exact rewards.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlpt_fast.prompt_layout import PROMPT_LAYOUTS
from rlpt_fast.rewards import COMPATS, METHODS

KL_TYPES = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCHEDULES = ("linear", "constant", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A bad config file, section, key or value; the message names it."""


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclass
class ModelSection:
    """path: Hugging Face Qwen2-VL / Qwen2.5-VL directory. dtype "auto": bfloat16 on CUDA,
    float32 elsewhere. device "auto": cuda if available. gradient_checkpointing None: on CUDA."""
    path: str = ""
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | None = None

    def __post_init__(self):
        _check(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               "model.device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass
class LoRASection:
    """enabled=false trains every weight outside the vision tower (full fine-tuning; with
    beta > 0 a frozen copy of the initial model then serves as the reference policy).
    target_modules: [] = every Linear outside the vision tower, lm_head included (RePIC)."""
    enabled: bool = True
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check(isinstance(self.r, int) and self.r > 0, "lora.r", f"must be a positive int, got {self.r!r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha!r}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout!r}")


@dataclass
class DataSection:
    """files: RePIC training rows (JSON/JSONL), relative to the config file. task_mix: reward
    method -> sampling weight ({} = the files' own proportions; weight 0 drops the task).
    prompt_layout: "training" (RePIC's run: images first, then the text) or "inference" (RePIC's
    evaluation layout, rebuilt from each row's "i. Name: ..., Info: ..." lines; name tasks only;
    see rlpt_fast/prompt_layout.py)."""
    files: list[str] = field(default_factory=list)
    task_mix: dict[str, float] = field(default_factory=dict)
    skip_invalid: bool = False
    shuffle: bool = True
    prompt_layout: str = "training"

    def __post_init__(self):
        if isinstance(self.files, str):
            self.files = [self.files]
        _check(all(isinstance(f, str) and f for f in self.files), "data.files",
               f"must be paths (non-empty strings), got {self.files!r}")
        for m, w in self.task_mix.items():
            _check(m in METHODS, "data.task_mix", f"unknown task {m!r} (expected one of {METHODS})")
            _check(isinstance(w, (int, float)) and w >= 0, f"data.task_mix.{m}", f"must be >= 0, got {w!r}")
        _check(not self.task_mix or sum(self.task_mix.values()) > 0, "data.task_mix", "all weights are 0")
        _check(self.prompt_layout in PROMPT_LAYOUTS, "data.prompt_layout",
               f"must be one of {PROMPT_LAYOUTS}, got {self.prompt_layout!r}")


@dataclass
class GRPOSection:
    """num_generations: G completions per prompt. mu: policy updates per generated batch (old
    log-probs kept from the first pass when mu > 1). scale_rewards: group|batch|none.
    reward_compat: "repic" (RePIC's reward code, quirks included) or "strict" (rlpt_fast.rewards).
    reward_fn: "" (RePIC's rewards) or "package.module:function", called as
    function(row, completion_text, prompt) -> float in [0, 1] for every completion."""
    num_generations: int = 8
    beta: float = 0.04
    kl: str = "k3"
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_type: str = "grpo"
    mu: int = 1
    scale_rewards: str = "group"
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_compat: str = "repic"
    reward_fn: str = ""

    def __post_init__(self):
        _check(self.num_generations >= 2, "grpo.num_generations",
               f"must be >= 2 (advantages compare completions of a prompt), got {self.num_generations}")
        _check(self.beta >= 0, "grpo.beta", f"must be >= 0, got {self.beta}")
        _check(self.kl in KL_TYPES, "grpo.kl", f"must be one of {KL_TYPES}, got {self.kl!r}")
        _check(self.eps_low >= 0 and self.eps_high >= 0, "grpo.eps_low/eps_high", "must be >= 0")
        _check(self.loss_type in LOSS_TYPES, "grpo.loss_type", f"must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        _check(self.mu >= 1, "grpo.mu", f"must be >= 1, got {self.mu}")
        _check(self.scale_rewards in ("group", "batch", "none"), "grpo.scale_rewards",
               f"must be group|batch|none, got {self.scale_rewards!r}")
        _check(self.max_new_tokens >= 1, "grpo.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.temperature > 0, "grpo.temperature", f"must be > 0 (RL samples), got {self.temperature}")
        _check(0 < self.top_p <= 1, "grpo.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "grpo.top_k", f"must be >= 0, got {self.top_k}")
        _check(self.reward_compat in COMPATS, "grpo.reward_compat",
               f"must be one of {COMPATS}, got {self.reward_compat!r}")
        _check(not self.reward_fn or ":" in self.reward_fn, "grpo.reward_fn",
               f"must be 'module:function', got {self.reward_fn!r}")


@dataclass
class OptimSection:
    """AdamW (fused where torch has it: fused "auto"). schedule: linear decay to 0 (RePIC /
    Hugging Face default), constant or cosine, after warmup_steps of linear warm-up."""
    lr: float = 1e-5
    schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    fused: str = "auto"

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1), got {self.betas!r}")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 = no clipping)")
        _check(self.fused in ("auto", "true", "false"), "optim.fused", f"must be auto|true|false, got {self.fused!r}")


@dataclass
class TrainSection:
    """One optimizer step consumes prompts_per_step * grad_accum prompts (all rolled out in one
    engine call, trained in grad_accum micro-batches). max_steps 0 = epochs over the data.
    checkpoint_every 0 = only at the end. max_nonfinite: consecutive skipped steps that abort."""
    prompts_per_step: int = 2
    grad_accum: int = 1
    epochs: int = 2
    max_steps: int = 0
    seed: int = 42
    output_dir: str = "runs/grpo"
    checkpoint_every: int = 0
    save_merged: bool = False
    max_nonfinite: int = 3
    progress: bool = True
    plots: bool = True
    tensorboard: bool = True
    dist_timeout_s: float = 600.0  # torchrun: a collective waiting longer fails (never a silent hang)

    def __post_init__(self):
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s", f"must be > 0, got {self.dist_timeout_s}")
        for name in ("prompts_per_step", "grad_accum", "epochs", "max_nonfinite"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from rlpt_fast.rollout.config import EngineConfig

        known = {f.name for f in dataclasses.fields(EngineConfig)}
        bad = sorted(set(self.engine) - known)
        _check(not bad, "engine", f"unknown key(s) {bad} (known: {sorted(known)})")
        try:
            EngineConfig(**self.engine)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"engine: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> TrainConfig:
        """Build from nested dicts; unknown sections/keys raise ConfigError naming them."""
        from rlpt_fast.train.config_file import config_from_dict

        return config_from_dict(raw, where)


SECTION_TYPES = {"model": ModelSection, "lora": LoRASection, "data": DataSection, "grpo": GRPOSection,
                 "optim": OptimSection, "train": TrainSection}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """TOML file (None: defaults) plus --key=value overrides -> TrainConfig (see config_file.py)."""
    from rlpt_fast.train.config_file import load_config as load

    return load(path, overrides)
