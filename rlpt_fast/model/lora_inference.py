"""LoRA's gradient-free path (rollout, reference and old log-probs): three kernels per adapted Linear.

    y = base(x);   y += (x @ A_c.T) @ B_s.T        A_c = A.to(dtype) (r, in), B_s = (scaling * B).to(dtype) (out, r)

i.e. the base matmul, one (N, in) x (in, r) matmul, and one addmm into y in place. The autograd path
(lora.py) casts the fp32 A and B to the activations' dtype on every call and scales separately: about
seven kernels per Linear, ~1,500 extra small kernels per decode step of a 36-layer model.

The cache (A_c, B_s) is held as plain tensor attributes of an InferenceCache object on the module:
not parameters, not buffers, so it is in no state_dict, checkpoint or PEFT file, is not moved or cast
by Module.to()/.half(), and is not broadcast by DDP (it is rebuilt where it is used).

Staleness is decided exactly by the key (A._version, B._version, A.data_ptr(), B.data_ptr(), dtype):
an optimizer step or load_adapter's copy_ writes in place and bumps _version; a replaced tensor
(`param.data = ...`, which does NOT bump _version, a new Parameter, Module.to()) has a new data_ptr.
A refresh writes INTO the cache's storage (copy_) whenever dtype, shape and device still fit, so CUDA
graphs captured over the cache read the new values at their next replay.

A replay runs no Python, so no key is checked there: it is the engine's explicit refresh at the start
of every generate call and before every capture (lora.pinned_lora_caches) that keeps graphs correct. Inside
that block the caches are "pinned": just refreshed, and the adapters cannot change until it exits, so
forward skips the key (one bool and one dtype identity test per Linear instead of ~2 us of module
attribute reads: 250 Linears x 256 eager decode steps). Outside it, every call checks the key.

ENABLED = False (or env RLPT_LORA_INFERENCE_CACHE=0 at import) forces the old per-call-cast path
everywhere; benchmarks/bench_rollout.py --lora flips it to time both paths in one run.
"""
from __future__ import annotations

import os

import torch

ENABLED: bool = os.environ.get("RLPT_LORA_INFERENCE_CACHE", "1") != "0"


class InferenceCache:
    """A_c (r, in) and B_s (out, r) of one LoRALinear in one dtype, with the key they were made from."""

    __slots__ = ("a", "b", "dtype", "key", "pinned")

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.key: tuple | None = None
        self.pinned = False

    def operands(self, layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_c, B_s) for `layer` (a LoRALinear) in `dtype`, refreshed first if stale."""
        if not (self.pinned and dtype is self.dtype):
            self.update(layer, dtype)
        return self.a, self.b

    def update(self, layer, dtype: torch.dtype) -> bool:
        """Refreshes from `layer`'s parameters if the key changed; returns whether it did."""
        a, b = layer.lora_A.weight, layer.lora_B.weight
        if _key(a, b, dtype) == self.key:
            return False
        self.refresh(a, b, layer.scaling, dtype)
        return True

    def refresh(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype) -> None:
        """Recomputes A_c and B_s from the parameters, in place when the storage still fits."""
        # inference_mode(False): a cache first made inside inference mode would be an inference
        # tensor, and the next in-place refresh outside it (a no_grad forward) would be refused.
        with torch.no_grad(), torch.inference_mode(False):
            self.a = _copy_into(self.a, a, dtype)
            self.b = _copy_into(self.b, b * scaling, dtype)  # scaled in fp32, rounded once
        self.dtype, self.key = dtype, _key(a, b, dtype)


def _key(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple:
    return a._version, b._version, a.data_ptr(), b.data_ptr(), dtype


def _copy_into(dst: torch.Tensor | None, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dst is not None and dst.dtype == dtype and dst.shape == src.shape and dst.device == src.device:
        return dst.copy_(src)
    return torch.empty(src.shape, dtype=dtype, device=src.device).copy_(src)


def add_low_rank_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y (..., out) += (x (..., in) @ a.T) @ b.T, a (r, in) and b (out, r) in y's dtype; returns y.
    In place on y (a fresh base output), so the sum is addmm's beta=1 epilogue, not another kernel."""
    low = x.reshape(-1, x.shape[-1]) @ a.t()  # (N, r)
    if y.is_contiguous():
        y.view(-1, y.shape[-1]).addmm_(low, b.t())
        return y
    return torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t()).view(y.shape)
