"""LoRA for the Qwen-VL decoder, in PEFT's naming so adapters move between us, peft and transformers.

A wrapped Linear computes  y = base(x) + scaling * B(A(dropout(x))),  scaling = alpha / r,
with A (r, in) Kaiming-uniform and B (out, r) zero at init, as peft does. Module attributes are
peft's (`base_layer`, `lora_A`, `lora_B`), so our module `model.language_model.layers.0.mlp.up_proj`
saves as `base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight`, the key peft
0.21 writes for the transformers model. Files (PEFT layout, merging) are in lora_io.py.

Inside `pinned_lora_caches(model)` (the engine's generate and graph capture), without gradients and
with dropout off, forward takes the cached path of lora_inference.py (3 kernels per Linear, 2 per
packed group with reserved rows) over a cache of the adapter in the activations' dtype, recomputed
in place when the block starts.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import lora_inference as _inference

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """r, alpha, dropout as in peft. target_modules: None = every nn.Linear outside the vision tower
    (lm_head included, RECIPE.md); a tuple of leaf names (`"q_proj"`) or full module names; or a
    regex string matched (re.fullmatch) against full module names. The vision tower is never wrapped.
    dtype: of the adapter parameters (see the comment on the field)."""
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str | None = None
    # Adapter parameters are kept in float32 (as peft's autocast_adapter_dtype does) so small AdamW
    # updates are not rounded away in bf16; they are cast to the activations' dtype to compute.
    # None = the base weight's dtype.
    dtype: torch.dtype | None = torch.float32

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"LoRAConfig.dtype must be a floating torch.dtype or None, got {self.dtype!r}")
        if isinstance(self.target_modules, str):
            re.compile(self.target_modules)  # fail now, not at apply time
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"LoRAConfig.target_modules must be non-empty names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, name: str) -> bool:
        """Whether the Linear module at full name `name` gets an adapter."""
        if _in_vision(name):
            return False
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)


def _in_vision(name: str) -> bool:
    return "visual" in name.split(".")


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank adapter. `disabled` turns the adapter off (reference policy)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float,
                 dtype: torch.dtype | None = None):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype or w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype or w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout_p = dropout
        self.disabled = False
        self.inference_cache = _inference.InferenceCache()  # a plain attribute: in no state_dict
        self.train(base_layer.training)  # wrapping an eval-mode model must not switch dropout on

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (out, in); the adapter is NOT in it (see effective_weight)."""
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in), differentiable w.r.t. A and B."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w if self.disabled else w + self.delta_weight().to(w.dtype)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * dropout(x) @ A.T  (..., r), in x's dtype (A cast to it: cheap, r x in)."""
        return F.linear(self.lora_dropout(x), self.lora_A.weight.to(x.dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_adapter(self.base_layer(x), x)

    def add_adapter(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + the adapter's output on x, for y = base_layer(x) (or its slice of a packed GEMM's
        output, packed_linear.py); in place on y on the pinned inference path."""
        if self.disabled:
            return y
        cache = self.pinned_cache(x)
        if cache is not None and y.dtype is x.dtype:
            return _inference.add_low_rank_(y, x, cache.a, cache.b)
        return y + F.linear(self.low_rank(x), self.lora_B.weight.to(x.dtype))

    def pinned_cache(self, x: torch.Tensor) -> _inference.InferenceCache | None:
        """The inference cache, if forward on x may use it: pinned for x's dtype, no gradient, no
        dropout (lora_inference.py); else None (the autograd path)."""
        cache = self.inference_cache
        if (cache.usable(x.dtype) and not torch.is_grad_enabled() and (self.dropout_p == 0.0 or not self.training)
                and _inference.ENABLED):
            return cache
        return None


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freezes every parameter of `model` and wraps the targeted Linears; returns their names.
    The config is kept as `model.lora_config` for save_adapter."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("apply_lora: the model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and cfg.targets(n)]
    if not names:
        raise ValueError(f"apply_lora: target_modules={cfg.target_modules!r} matched no nn.Linear")
    for name in names:
        set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout, cfg.dtype))
    model.lora_config = cfg
    return names


@contextmanager
def adapter_disabled(model: nn.Module):
    """Within the block the model is the base model exactly (reference log-probs; no weight copy)."""
    with _switched_on([m for _, m in lora_layers(model)], "disabled"):
        yield model


def refresh_lora_caches(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Recomputes every LoRA layer's inference cache from its parameters, in place where the storage
    fits (CUDA graphs captured over it then read the new values), for activations of `dtype` (None:
    each base weight's dtype). Unconditional: no cheap test tells a stale cache (lora_inference.py).
    Builds no new cache while lora_inference.ENABLED is off. Returns how many it refreshed."""
    n = 0
    for _, m in lora_layers(model):
        if _inference.ENABLED or m.inference_cache.a is not None:
            m.inference_cache.refresh(m.lora_A.weight, m.lora_B.weight, m.scaling, dtype or m.base_layer.weight.dtype)
            n += 1
    _refresh_group_caches(model)
    return n


def _refresh_group_caches(model: nn.Module) -> None:
    """Each packed group (packed_linear.py) whose members are all adapted with refreshed caches of
    one dtype gets its GroupCache (on its first member) refreshed from them (its A into the rows
    reserved for it after the group's weights, where there are such rows)."""
    from .packed_linear import adapter_operands, projection_groups  # it imports this module

    for members in projection_groups(model):
        if not all(isinstance(m, LoRALinear) and m.inference_cache.a is not None for m in members):
            continue
        caches = [m.inference_cache for m in members]
        if any(c.dtype != caches[0].dtype for c in caches):
            caches[0].group = None
            continue
        fused = adapter_operands(members)
        if len(members) == 1 and fused is None:  # a lone projection gains only from reserved rows
            caches[0].group = None
            continue
        caches[0].group = caches[0].group or _inference.GroupCache()
        caches[0].group.refresh(caches, fused)


@contextmanager
def pinned_lora_caches(model: nn.Module, dtype: torch.dtype | None = None):
    """Refreshes every cache, then lets forward use it (gradient-free, dropout off) within the block.
    The adapters must not change inside the block (the engine's generate and graph capture)."""
    refresh_lora_caches(model, dtype)
    with _switched_on([m.inference_cache for _, m in lora_layers(model)], "pinned"):
        yield model


@contextmanager
def _switched_on(objects: list, flag: str):
    """Sets the bool attribute `flag` of every object within the block, then puts each value back."""
    before = [getattr(o, flag) for o in objects]
    for o in objects:
        setattr(o, flag, True)
    try:
        yield
    finally:
        for o, was in zip(objects, before):
            setattr(o, flag, was)


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The (V, H) weight that lm_head applies: W + scaling * B @ A with LoRA (differentiable w.r.t. A
    and B), W without. For rlpt_kernels.grpo_loss_from_hidden(hidden, weight, ...). Ignores the
    adapter's dropout; use lm_head_operands for exactness when dropout is on in training."""
    head = model.lm_head
    return head.effective_weight() if isinstance(head, LoRALinear) else head.weight


def lm_head_operands(model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden', weight') with hidden' @ weight'.T == lm_head(hidden) exactly, dropout included:
    hidden' = [hidden, scaling * dropout(hidden) @ A.T]  (N, H + r),  weight' = [W, B]  (V, H + r).
    Costs one (V, H + r) concat instead of materializing W + B @ A."""
    head = model.lm_head
    if not isinstance(head, LoRALinear) or head.disabled:
        return hidden, head.weight
    b, w = head.lora_B.weight, head.base_layer.weight
    return torch.cat([hidden, head.low_rank(hidden)], dim=-1), torch.cat([w, b.to(w.dtype)], dim=-1)
