"""One GEMM for the projections that read the same input: q/k/v, and gate/up.

A decode step at batch 64-128 is launch-bound (decoder.py): q, k and v are three GEMMs where k and
v are tiny (2 KV heads: 1 MB of weights each at the 3B shape), and gate/up are two. vLLM keeps such
weights concatenated in one parameter; we keep transformers' modules and parameter names (the
loader, PEFT's adapter keys and the LoRA wrappers depend on them) and instead move the weights'
data into one tensor, each Parameter becoming a row block of it (`pack_linears`). The Parameter
objects stay the same, so the optimizer, load_state_dict and the loader keep updating them in
place and a packed GEMM always reads the current weights: nothing is copied to refresh.

Modules that hold such groups derive from `PackedProjections` and name them. Anything that
replaces a parameter's data (`model.to(...)`, FSDP's sharding) silently breaks the packing;
`packed_operands` checks the layout on every call (a few pointer compares) and `project` then runs
the projections one by one. The packed GEMM is used only where no gradient is needed for
the packed weights (inference, the reference policy, LoRA training with the base frozen): the
parameters' own gradients would not flow through it.

LoRA (the recipe's rollouts adapt every Linear): a group whose members are all LoRA wrappers gets
rows reserved after its weights for its adapters' A (and zero bias rows), and the rollout's
inference cache (lora_inference.GroupCache) writes the stacked A there. Then one GEMM gives both
the base outputs and x @ A.T, and one addmm adds the block-diagonal B: 2 kernels per adapted group
instead of 3. o_proj and down_proj are groups of one for this alone (`pack_linears` leaves an
unadapted lone projection where it is).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALinear
from . import lora_inference
from .lora_inference import GroupCache, add_low_rank_, add_stacked_low_rank_


def _base(module: nn.Module) -> nn.Linear | None:
    """The plain nn.Linear that holds a projection's weight (a LoRA wrapper's base), else None."""
    base = module.base_layer if isinstance(module, LoRALinear) else module
    return base if type(base) is nn.Linear else None


def pack_linears(modules: Sequence[nn.Module]) -> bool:
    """Moves the weights (and biases) of `modules` (nn.Linear or LoRALinear, one input size, dtype
    and device) into one (sum of out_features [+ sum of LoRA ranks], in_features) tensor (and one
    bias), each parameter becoming a row block of it; values, Parameter objects and requires_grad
    are unchanged. When every member is a LoRA wrapper, rows for the adapters' A follow the weights
    (`adapter_operands`). Idempotent. Returns whether the modules are packed (False: not packable,
    or a lone projection with no adapter to gain from it: left as they were)."""
    bases = [_base(m) for m in modules]
    if any(b is None for b in bases):
        return False
    reserve, have = _adapter_rows(modules), _reservation(bases)
    if len(modules) == 1 and not reserve and not have:
        return False
    if packed_operands(modules) is not None and (have == reserve or not reserve):
        return True  # rows reserved before are kept when none are wanted now (cache switched off)
    weights = [b.weight for b in bases]
    biases = [b.bias for b in bases]
    w0 = weights[0]
    if any(type(p.data) is not torch.Tensor or p.dtype != w0.dtype or p.device != w0.device
           for p in weights + [b for b in biases if b is not None]):
        return False  # a DTensor shard (FSDP), mixed dtypes or devices: leave them alone
    if any(w.shape[1] != w0.shape[1] for w in weights) or any((b is None) != (biases[0] is None) for b in biases):
        return False
    # inference_mode(False) first (it turns grad mode on): packing inside inference mode must not
    # turn the weights into inference tensors, which autograd refuses to save for a training backward
    with torch.inference_mode(False), torch.no_grad():
        _move_into_one(weights, reserve)
        if biases[0] is not None:
            _move_into_one(biases, reserve)
    _reserved[bases[0]] = (_addresses(bases), reserve)
    return True


def _adapter_rows(modules: Sequence[nn.Module]) -> int:
    """Rows to reserve after a group's weights for its adapters' A: the ranks summed when every
    member is a LoRA wrapper and the inference cache (which fills them) is on; else 0."""
    if not lora_inference.ENABLED or not all(isinstance(m, LoRALinear) for m in modules):
        return 0
    return sum(m.lora_A.out_features for m in modules)


def _move_into_one(params: list[nn.Parameter], extra_rows: int = 0) -> None:
    p0 = params[0]
    tail = [p0.detach().new_zeros(extra_rows, *p0.shape[1:])] if extra_rows else []
    packed = torch.cat([p.detach() for p in params] + tail)
    start = 0
    for p in params:
        p.data = packed[start:start + p.shape[0]]
        start += p.shape[0]


class PackedProjections(nn.Module):
    """Base of a module whose projections read one input: PACKED_PROJECTIONS names each group
    (attribute names, in output order). Moving or casting the module (Module._apply: to, cuda,
    half, ...) gives its parameters new data: the views cached for its groups are dropped then,
    since they would keep the old storage alive (where the parameters did not move, they stay)."""

    PACKED_PROJECTIONS: tuple[tuple[str, ...], ...] = ()

    def projection_groups(self) -> list[list[nn.Module]]:
        return [[getattr(self, name) for name in names] for names in self.PACKED_PROJECTIONS]

    def _apply(self, fn, recurse=True):
        groups = [bases for bases in ([_base(m) for m in g] for g in self.projection_groups())
                  if all(b is not None for b in bases)]
        before = [_layout(bases) for bases in groups]
        out = super()._apply(fn, recurse)
        for bases, layout in zip(groups, before):
            # only where the parameters moved or changed dtype: a no-op .to() keeps the packing
            # and its reserved rows, which CUDA graphs captured before it still read
            if _layout(bases) != layout:
                _checked.pop(bases[0], None)
                _reserved.pop(bases[0], None)
        return out


def projection_groups(model: nn.Module) -> list[list[nn.Module]]:
    """Every group of projections the model's PackedProjections modules name."""
    return [group for m in model.modules() if isinstance(m, PackedProjections) for group in m.projection_groups()]


# The last layout check per group, keyed by its first base Linear: (parameter addresses, operands).
# project() runs per layer per step, and the full check costs ~25 us of host time per group; the
# addresses, ~3. A hit is sound: the cached operands keep their storage alive, and no other live
# allocation overlaps it, so parameters found at the same addresses are still its row blocks.
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Rows pack_linears reserved after each group's weights for its adapters' A, keyed the same way:
# (parameter addresses at packing, rows). The addresses tell whether that allocation still holds them.
_reserved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _addresses(bases: list[nn.Linear]) -> tuple[int, ...]:
    # the hot key (every project call): data pointers alone, ~3 us for a q/k/v group (with dtype
    # and shape, ~13). An _apply that keeps the addresses but not the dtype is caught in _apply.
    return tuple(p.data_ptr() for b in bases for p in (b.weight, b.bias) if p is not None)


def _layout(bases: list[nn.Linear]) -> tuple:
    return tuple((p.data_ptr(), p.dtype, p.shape) for b in bases for p in (b.weight, b.bias) if p is not None)


def _reservation(bases: list[nn.Linear]) -> int:
    entry = _reserved.get(bases[0])
    return entry[1] if entry is not None and entry[0] == _addresses(bases) else 0


def packed_operands(modules: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (sum out, in), bias (sum out,) or None) viewing the modules' parameters in order, if
    they are consecutive row blocks of one allocation; else None. The views are detached (normal
    tensors even when made in inference mode)."""
    return _operands([_base(m) for m in modules])


def _operands(bases: list[nn.Linear | None]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if any(b is None for b in bases):
        return None
    addresses = _addresses(bases)
    hit = _checked.get(bases[0])
    if hit is not None and hit[0] == addresses:
        return hit[1]
    operands = _check_layout(bases)
    _checked[bases[0]] = (addresses, operands)
    return operands


def adapter_operands(modules: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (sum out + sum r, in), bias (sum out + sum r,) or None): the group's packed
    parameters and, after them, the rows pack_linears reserved for its adapters' A (bias rows
    zero), if that reservation still holds the parameters; else None."""
    bases = [_base(m) for m in modules]
    if any(b is None for b in bases):
        return None
    rows = _reservation(bases)
    operands = _operands(bases) if rows else None
    if operands is None:
        return None
    weight, bias = bases[0].weight.data, bases[0].bias.data if operands[1] is not None else None
    total = operands[0].shape[0] + rows
    # from .data: a tensor with its own version counter, so writing A into the reserved rows does
    # not look like a change of the weights to a backward that saved them
    try:  # bounds-checked by torch against the packed allocation
        return (weight.as_strided((total, weight.shape[1]), weight.stride()),
                None if bias is None else bias.as_strided((total,), bias.stride()))
    except RuntimeError:
        return None


def _check_layout(bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    weight = _consecutive([b.weight for b in bases])
    if weight is None:
        return None
    if all(b.bias is None for b in bases):
        return weight, None
    if any(b.bias is None for b in bases):
        return None
    bias = _consecutive([b.bias for b in bases])
    return None if bias is None else (weight, bias)


def _consecutive(params: list[torch.Tensor]) -> torch.Tensor | None:
    """A view of the params stacked along dim 0, if each is contiguous, shaped like the first past
    dim 0, and starts where the one before ends; else None. The view is made from the first
    param's storage, which torch bounds-checks: it exists only if that storage spans them all,
    and then its rows are the params' own bytes."""
    p0 = params[0]
    end, rows = p0.data_ptr(), 0
    for p in params:
        if p.dtype is not p0.dtype or p.shape[1:] != p0.shape[1:] or not p.is_contiguous() or p.data_ptr() != end:
            return None
        end += p.numel() * p.element_size()
        rows += p.shape[0]
    try:
        return p0.detach().as_strided((rows, *p0.shape[1:]), p0.stride())
    except RuntimeError:  # back to back by chance, in separate allocations
        return None


def project(x: torch.Tensor, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """[m(x) for m in modules], from one GEMM when their weights are packed and no gradient is
    needed for them; LoRA wrappers add their adapters to their slices (a pinned, fully adapted
    group with reserved rows: its A inside that GEMM). Outputs may be column views of one
    (..., sum out) tensor (row stride = sum out or more, last dim contiguous)."""
    if len(modules) == 1 and not isinstance(modules[0], LoRALinear):  # nothing to pack (o_proj, down_proj)
        return [modules[0](x)]
    bases = [_base(m) for m in modules]
    if any(b is None for b in bases) or _needs_own_calls(modules, bases):
        return [m(x) for m in modules]
    sizes = [b.out_features for b in bases]
    group = _pinned_group(modules, x)
    # under autocast the GEMM's output would not be in the cache's dtype
    fused = group.fused if group is not None and not torch.is_autocast_enabled(x.device.type) else None
    operands = _operands(bases) if len(modules) > 1 or fused is not None else None
    if operands is None:
        return [m(x) for m in modules]
    if fused is not None and fused[0].data_ptr() == operands[0].data_ptr():  # the reservation still holds them
        y = add_stacked_low_rank_(F.linear(x, *fused), operands[0].shape[0], group.b)
        return list(y.split(sizes, dim=-1))
    y = F.linear(x, *operands)
    if group is not None and y.dtype is x.dtype:  # every member adapted: one low-rank pair, in place on y
        return list(add_low_rank_(y, x, group.a, group.b).split(sizes, dim=-1))
    return [m.add_adapter(o, x) if isinstance(m, LoRALinear) else o for m, o in zip(modules, y.split(sizes, dim=-1))]


def _pinned_group(modules: Sequence[nn.Module], x: torch.Tensor) -> GroupCache | None:
    """The group's adapter cache (lora_inference.GroupCache) if every member's adapter is on and
    its pinned cache serves x; else None."""
    first = modules[0]
    if not isinstance(first, LoRALinear) or first.inference_cache.group is None:
        return None
    if not all(isinstance(m, LoRALinear) and not m.disabled and m.pinned_cache(x) is not None for m in modules):
        return None
    group = first.inference_cache.group
    return group if group.dtype is x.dtype else None


def _needs_own_calls(modules: Sequence[nn.Module], bases: list[nn.Linear | None]) -> bool:
    """Hooks on a projection or its base Linear, or global module hooks (they must see its call),
    or a gradient wanted for a packed weight."""
    if any(_GLOBAL_HOOKS):
        return True
    if any(_has_hooks(m) or (b is not None and _has_hooks(b)) for m, b in zip(modules, bases)):
        return True
    if not torch.is_grad_enabled():
        return False
    return any(b is None or b.weight.requires_grad or (b.bias is not None and b.bias.requires_grad) for b in bases)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


# torch.nn.modules.module's registries of hooks for every module (register_module_forward_hook, ...)
_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, None) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def pack_projections(model: nn.Module) -> int:
    """Packs every group of projections the model's PackedProjections modules name (the decoder's
    q/k/v and gate/up, and with LoRA o_proj and down_proj alone, for their adapters' rows);
    returns how many groups are packed. Idempotent; call it again
    after anything that replaced parameter data (model.to, load_state_dict(assign=True)). A model
    sharded with FSDP is left alone: FSDP owns its parameters' storage (it frees and re-allocates
    the gathered parameters' storage at every reshard), so it returns 0."""
    if _fsdp_sharded(model):
        return 0
    return sum(pack_linears(group) for group in projection_groups(model))


def _fsdp_sharded(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())
