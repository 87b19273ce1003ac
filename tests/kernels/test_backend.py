"""The public functions pick Triton or the reference in one place, by device (and env override)."""
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


def test_every_public_op_has_a_reference_with_the_same_signature():
    import inspect

    for name in ["token_logprobs", "token_logprobs_from_hidden", "grpo_loss",
                 "grpo_loss_from_hidden", "group_advantages"]:
        assert hasattr(reference, name)
        assert inspect.signature(getattr(rlpt_kernels, name)) == inspect.signature(
            getattr(reference, name))
