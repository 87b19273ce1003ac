"""Counting the kernels a piece of code launches, on any device (the CPU included).

A decode step at batch 64-128 is launch-bound, so its kernel count is a figure of merit that the
CPU can measure: benchmarks/bench_decode_layer.py reports it and tests/rollout/test_launch_counts.py
holds the engine's decode step to it.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlpt_kernels import decode_ops


class _LaunchCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel and Triton launches. An aten op launches one when it
    writes memory: it mutates, or returns a tensor in storage none of its inputs has (views,
    allocations and dtype queries do not). The aten ops the interpreter itself runs around a
    Triton launch are not counted."""
    ALLOCATIONS = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                   torch.ops.aten.empty_like.default})

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and func not in self.ALLOCATIONS:
            self.count += func._schema.is_mutable or _writes_new_storage((args, kwargs), out)
        return out


def _writes_new_storage(inputs, out) -> bool:
    tensors = lambda tree: [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
    seen = {t.untyped_storage().data_ptr() for t in tensors(inputs)}
    return any(t.untyped_storage().data_ptr() not in seen for t in tensors(out))


def count_launches(fn) -> int:
    """Kernels fn() launches, by the dispatcher's count: aten ops that write memory, and Triton launches."""
    cls = type(decode_ops._rms_norm_kernel)  # JITFunction, or InterpretedFunction in the interpreter
    run = cls.run
    with _LaunchCounter() as counter:
        def counted(self, *args, **kwargs):
            counter.count, counter.paused = counter.count + 1, True
            try:
                return run(self, *args, **kwargs)
            finally:
                counter.paused = False
        cls.run = counted
        try:
            fn()
        finally:
            cls.run = run
    return counter.count
