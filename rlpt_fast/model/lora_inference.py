"""LoRA's rollout path (inside the engine's generate): three kernels per adapted Linear, two per
packed group with reserved rows (below).

    y = base(x);   y += (x @ A_c.T) @ B_s.T        A_c = A.to(dtype) (r, in), B_s = (scaling * B).to(dtype) (out, r)

i.e. the base matmul, one (N, in) x (in, r) matmul, and one addmm into y in place. The autograd path
(lora.py) casts the fp32 A and B to the activations' dtype on every call and scales separately: about
seven kernels per Linear, ~1,500 extra small kernels per decode step of a 36-layer model.
(The reference forward runs with the adapter disabled: the base matmul alone, no cache needed.)

The cache (A_c, B_s) is held as plain tensor attributes of an InferenceCache object on the module:
not parameters, not buffers, so it is in no state_dict, checkpoint or PEFT file, is not moved or cast
by Module.to()/.half(), and is not broadcast by DDP.

Staleness: the cache is used ONLY inside a pinned block (lora.pinned_lora_caches: the engine's
generate and its CUDA graph capture), which starts by recomputing every cache unconditionally, in
place, and promises that the adapters do not change until it exits. Outside such a block forward
takes the autograd path. No cheaper staleness test is exact: `_version` is NOT bumped by fused AdamW
(torch 2.14: `AdamW(fused=True)`, the trainer's default, leaves it at 0), by writes through
`param.data` or by numpy/DLPack views, so a version key would serve stale adapters after the
trainer's own optimizer step. The refresh costs ~3 small kernels per adapted Linear once per
generate call (~760 for a 3B model), against ~1,500 saved per decode step.

In place: a refresh writes INTO the cache's storage (copy_) whenever dtype, shape and device still
fit, so CUDA graphs captured over the cache read the new values at their next replay. A replay runs
no Python and checks nothing: the refresh at the start of every generate call is what keeps graphs
correct. Inside the block forward tests one bool and one dtype identity per Linear (no module
attribute reads: 250 Linears x 256 eager decode steps).

Packed projections (packed_linear.py: q/k/v, gate/up as one GEMM) take their adapters together too:
a GroupCache stacks the members' A_c (sum r, in) and puts their B_s on a block diagonal
(sum out, sum r), so the whole group's adapters are one more matmul and one addmm into the packed
output (3 kernels for q/k/v instead of 9, 3 for gate/up instead of 6). It is derived from the
members' caches by the same refresh (lora.refresh_lora_caches: 4 more kernels per q/k/v group, 3
per gate/up group), in place, and used under the same pin, so it is never staler than they are.
Where the packing reserved rows after the group's weights for it (packed_linear.adapter_operands;
o_proj and down_proj are groups of one for this), the stacked A is written into those rows, so
the base GEMM computes x @ A.T too and the group costs 2 kernels (`add_stacked_low_rank_`).

ENABLED = False (or env RLPT_LORA_INFERENCE_CACHE=0 at import) forces the old per-call-cast path
everywhere; benchmarks/bench_rollout.py --lora flips it to time both paths in one run.
"""
from __future__ import annotations

import os

import torch

ENABLED: bool = os.environ.get("RLPT_LORA_INFERENCE_CACHE", "1") != "0"


class InferenceCache:
    """A_c (r, in) and B_s (out, r) of one LoRALinear in one dtype; `pinned` while they may be used."""

    __slots__ = ("a", "b", "dtype", "pinned", "group")

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.pinned = False
        self.group: GroupCache | None = None  # on a packed group's first member (see GroupCache)

    def usable(self, dtype: torch.dtype) -> bool:
        return self.pinned and dtype is self.dtype

    def refresh(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype) -> None:
        """Recomputes A_c and B_s from the parameters, in place when the storage still fits."""
        # inference_mode(False): a cache first made inside inference mode would be an inference
        # tensor, and a later in-place refresh outside it would be refused. It turns grad mode ON,
        # so no_grad comes after it (the other order recorded every refresh in autograd).
        with torch.inference_mode(False), torch.no_grad():
            self.a = _copy_into(self.a, a, dtype)
            self.b = _copy_into(self.b, b * scaling, dtype)  # scaled in fp32, rounded once
        self.dtype = dtype


class GroupCache:
    """The adapters of a packed group as one low-rank pair, in its members' cache dtype: a (sum r,
    in) = their A_c stacked, b (sum out, sum r) = their B_s on the block diagonal, zero elsewhere
    (the zeros: ~3.5 MB per 3B layer in bf16 at r = 64, 125 MB for its 36 layers). fused: the
    (weight, bias) of packed_linear.adapter_operands when a is their reserved rows, else None."""

    __slots__ = ("a", "b", "dtype", "fused")

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def refresh(self, caches: list[InferenceCache],
                fused: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:
        """Recomputes a and b from the members' refreshed caches, in place when the storage fits;
        a into the last rows of fused's weight (reserved for it) where they fit."""
        c0 = caches[0]
        shape_a = (sum(c.a.shape[0] for c in caches), c0.a.shape[1])
        shape_b = (sum(c.b.shape[0] for c in caches), shape_a[0])
        like = (c0.dtype, c0.a.device)
        rows = fused[0][fused[0].shape[0] - shape_a[0]:] if fused is not None else None
        if rows is not None and (rows.shape, rows.dtype, rows.device) != (shape_a, *like):
            rows, fused = None, None
        with torch.inference_mode(False), torch.no_grad():  # the order: InferenceCache.refresh
            if self.b is None or (self.b.shape, self.b.dtype, self.b.device) != (shape_b, *like):
                self.b = torch.zeros(shape_b, dtype=c0.dtype, device=c0.a.device)  # off-diagonal: zero for good
            if rows is not None:
                self.a = rows
            elif self.a is None or self.fused is not None or (  # not the rows of an earlier packing
                    self.a.shape, self.a.dtype, self.a.device) != (shape_a, *like):
                self.a = torch.empty(shape_a, dtype=c0.dtype, device=c0.a.device)
            torch.cat([c.a for c in caches], out=self.a)
            row = col = 0
            for c in caches:
                out, r = c.b.shape
                self.b[row:row + out, col:col + r].copy_(c.b)
                row, col = row + out, col + r
        self.dtype, self.fused = c0.dtype, fused


def _copy_into(dst: torch.Tensor | None, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dst is not None and dst.dtype == dtype and dst.shape == src.shape and dst.device == src.device:
        return dst.copy_(src)
    return torch.empty(src.shape, dtype=dtype, device=src.device).copy_(src)


def add_stacked_low_rank_(y: torch.Tensor, n_out: int, b: torch.Tensor) -> torch.Tensor:
    """y (..., n_out + r) = [x @ W.T + bias, x @ A.T] from one GEMM over W and A stacked (the
    reserved rows of a packed group); returns y's first n_out columns + (x @ A.T) @ b.T, b (n_out,
    r), in place (addmm's beta=1 epilogue into a column slice: rows strided, last dim contiguous)."""
    rows = y.reshape(-1, y.shape[-1])  # a view: y is a fresh GEMM output
    rows[:, :n_out].addmm_(rows[:, n_out:], b.t())
    return y[..., :n_out]


def add_low_rank_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y (..., out) += (x (..., in) @ a.T) @ b.T, a (r, in) and b (out, r) in y's dtype; returns y.
    In place on y (a fresh base output, or its column slice of a packed GEMM's output: rows strided,
    last dim contiguous), so the sum is addmm's beta=1 epilogue, not another kernel."""
    low = x.reshape(-1, x.shape[-1]) @ a.t()  # (N, r)
    rows = y if y.dim() == 2 else (y.view(-1, y.shape[-1]) if y.is_contiguous() else None)
    if rows is not None and rows.stride(-1) == 1:
        rows.addmm_(low, b.t())
        return y
    return torch.addmm(y.reshape(-1, y.shape[-1]), low, b.t()).view(y.shape)
