"""The public functions pick Triton or the reference in one place, by device (and env override)."""
import inspect
import re
import sys

import pytest
import torch

import rlpt_kernels
from rlpt_kernels import backend, reference


def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("RLPT_KERNELS_BACKEND", raising=False)
    assert backend.backend_for(torch.zeros(1)) == "torch"
    x = torch.randn(2, 3, 10, requires_grad=True)
    out = rlpt_kernels.token_logprobs(x, torch.randint(0, 10, (2, 3)))
    assert "TokenLogprobs" not in type(out.grad_fn).__name__  # plain torch autograd graph


def test_env_override_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("RLPT_KERNELS_BACKEND", "triton")
    logits, ids = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    out = rlpt_kernels.token_logprobs(logits, ids)
    torch.testing.assert_close(out, reference.token_logprobs(logits, ids))
    x = logits.clone().requires_grad_(True)
    assert "TokenLogprobs" in type(rlpt_kernels.token_logprobs(x, ids).grad_fn).__name__


# public name -> the module of its Triton implementation
TRITON_MODULES = {"token_logprobs": "token_logprobs", "token_logprobs_from_hidden": "fused_linear",
                  "grpo_loss": "grpo_loss", "grpo_loss_from_hidden": "fused_linear",
                  "group_advantages": "group_advantages", "rms_norm": "decode_ops",
                  "add_rms_norm": "decode_ops", "silu_mul": "decode_ops", "rotary": "decode_ops"}


def _triton(name):
    return getattr(sys.modules[f"rlpt_kernels.{TRITON_MODULES[name]}"], name)


def test_every_public_op_has_a_reference_with_the_same_signature():
    """The Triton function itself against the reference (the public name's signature is one of
    the two, so comparing it with the reference alone would compare the reference with itself)."""
    assert sorted(TRITON_MODULES) == sorted(n for n in rlpt_kernels.__all__ if n != "reference")
    for name in TRITON_MODULES:
        assert inspect.signature(_triton(name)) == inspect.signature(getattr(reference, name)), name


@pytest.mark.parametrize("name", sorted(TRITON_MODULES))
def test_public_docstrings_document_every_argument(name):
    public = getattr(rlpt_kernels, name)
    undocumented = [p for p in inspect.signature(public).parameters
                    if not re.search(rf"\b{p}\b", public.__doc__ or "")]
    assert not undocumented, f"rlpt_kernels.{name}: {undocumented} not in its docstring"
