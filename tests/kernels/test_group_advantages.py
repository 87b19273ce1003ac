"""group_advantages (Triton, interpreter on CPU) against the reference, fp64 and hand values."""
import pytest
import torch

from rlpt_kernels import reference
from rlpt_kernels.group_advantages import group_advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("n_groups,G", [(1, 8), (5, 3), (4, 13)])
def test_forward_backward_match_reference_fp64(scale, n_groups, G, device):
    g = torch.Generator().manual_seed(G * 7 + n_groups)
    rewards = torch.rand(n_groups * G, generator=g, dtype=torch.float64).to(device)
    grad_out = torch.randn(n_groups * G, generator=g, dtype=torch.float64).to(device)
    r1, r2 = rewards.clone().requires_grad_(True), rewards.clone().requires_grad_(True)
    ours, ref = group_advantages(r1, G, scale=scale), reference.group_advantages(r2, G, scale=scale)
    (ours * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-4, atol=1e-6)


def test_hand_computed_values(device):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], device=device)
    adv = group_advantages(r, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased: sqrt(1/3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(adv[:4].cpu(), expected)
    assert (adv[4:] == 0).all()  # identical rewards: exactly zero


def test_identical_groups_are_exact_zeros_without_nan(device):
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7, 0.2], device=device, requires_grad=True)
    for scale in ["group", "batch", "none"]:
        adv = group_advantages(r, 3, scale=scale)
        assert (adv[:3] == 0).all()
        (grad,) = torch.autograd.grad(adv.square().sum() + adv.sum(), r)
        assert torch.isfinite(grad).all()


def test_bad_inputs(device):
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6, device=device), 4)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        group_advantages(torch.zeros(0, device=device), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4, device=device), 4, scale="rank")
