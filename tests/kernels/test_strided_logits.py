"""Logits that are views, not copies: logits[:, :-1] of a (B, T + 1, V) model output (the shift
every GRPO loss does) and a (T, B, V) tensor transposed to (B, T, V). The kernels read such
rows through their two strides; a reshape would copy the whole tensor, and an in-place backward
would then write into the copy. Values and gradients must equal the reference on a contiguous
copy, and the in-place gradient must land in the original storage."""
import pytest
import torch

from rlpt_kernels import reference
from rlpt_kernels.grpo_loss import grpo_loss
from rlpt_kernels.row_softmax import row_layout
from rlpt_kernels.token_logprobs import token_logprobs

B, T, V = 3, 7, 517


def _views(device):
    g = torch.Generator().manual_seed(11)
    full = (torch.randn(B, T + 1, V, generator=g) * 3).to(device)
    seq_major = (torch.randn(T, B, V, generator=g) * 3).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    return {"shifted": (full, lambda t: t[:, :-1]), "transposed": (seq_major, lambda t: t.transpose(0, 1))}, ids


def test_row_layout_keeps_strides_instead_of_copying():
    full = torch.zeros(B, T + 1, V)
    assert row_layout(full[:, :-1]) == (T, (T + 1) * V, V)
    assert row_layout(full) == (B * (T + 1), 0, V)
    with pytest.raises(ValueError, match="contiguous vocab"):
        row_layout(full.transpose(1, 2))


@pytest.mark.parametrize("kind", ["shifted", "transposed"])
def test_token_logprobs_reads_views_and_writes_the_gradient_in_place(kind, device):
    views, ids = _views(device)
    base, view_of = views[kind]
    grad_out = torch.randn(B, T, device=device)
    x64 = view_of(base).double().requires_grad_(True)
    (reference.token_logprobs(x64, ids) * grad_out.double()).sum().backward()

    storage = base.clone().requires_grad_(True)
    work = storage * 1.0  # a non-leaf: its storage may take the gradient
    logits = view_of(work)
    ours = token_logprobs(logits, ids, inplace_backward=True)
    torch.testing.assert_close(ours.double(), reference.token_logprobs(x64.detach(), ids), rtol=1e-5, atol=2e-5)
    (ours * grad_out).sum().backward()
    torch.testing.assert_close(storage.grad.double(), _embed(x64.grad, kind, base), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(view_of(work).double(), x64.grad, rtol=1e-5, atol=1e-6)  # written in place


@pytest.mark.parametrize("kind", ["shifted", "transposed"])
def test_grpo_loss_reads_views(kind, device):
    views, ids = _views(device)
    base, view_of = views[kind]
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(B, generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.3).float().to(device)
    old = (torch.randn(B, T, generator=g) * 0.1 - 6).to(device)
    kw = dict(old_logp=old, ref_logp=old + 0.05, beta=0.04, loss_type="dapo")
    x64 = view_of(base).double().requires_grad_(True)
    exact, _ = reference.grpo_loss(x64, ids, adv.double(), mask.double(), **{**kw, "old_logp": old.double(),
                                                                          "ref_logp": old.double() + 0.05})
    exact.backward()
    x = base.clone().requires_grad_(True)
    loss, _ = grpo_loss(view_of(x), ids, adv, mask, **kw)
    loss.backward()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), _embed(x64.grad, kind, base), rtol=1e-5, atol=1e-6)


def _embed(grad_view: torch.Tensor, kind: str, base: torch.Tensor) -> torch.Tensor:
    """The view's gradient placed in a tensor shaped like the base (zeros where the view is not)."""
    if kind == "transposed":
        return grad_view.transpose(0, 1)
    out = torch.zeros_like(base, dtype=torch.float64)
    out[:, :-1] = grad_view
    return out
