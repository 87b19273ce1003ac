"""The one place that decides which implementation runs.

Triton for CUDA tensors, the pure-torch reference for everything else. RLPT_KERNELS_BACKEND
overrides it: "torch" forces the reference everywhere (debugging, bisecting a numeric issue);
"triton" forces Triton on CPU too (only sensible with TRITON_INTERPRET=1, as the tests do).
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

_CHOICES = ("auto", "triton", "torch")


def backend_for(tensor: torch.Tensor) -> str:
    choice = os.environ.get("RLPT_KERNELS_BACKEND", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"RLPT_KERNELS_BACKEND must be one of {_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    return "triton" if tensor.is_cuda else "torch"


def dispatch(triton_fn: Callable, torch_fn: Callable) -> Callable:
    """A function that runs triton_fn or torch_fn by backend_for. It shows triton_fn's docstring,
    the one that spells out shapes, dtypes and layouts; both share one signature (a test checks)."""
    @functools.wraps(triton_fn)
    def run(first: torch.Tensor, *args, **kwargs):
        fn = triton_fn if backend_for(first) == "triton" else torch_fn
        return fn(first, *args, **kwargs)

    return run
