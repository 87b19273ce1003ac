"""token_logprobs (Triton, in the interpreter on CPU) against the torch reference and fp64."""
import pytest
import torch

from rlpt_kernels import reference
from rlpt_kernels.token_logprobs import token_logprobs


def _inputs(B, T, V, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype).to(device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    return logits, ids


@pytest.mark.parametrize("V", [1000, 4097])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 37), (1, 128)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_backward_match_reference_and_fp64(B, T, V, temperature, device):
    logits, ids = _inputs(B, T, V, torch.float32, device, seed=V + T)
    x = logits.clone().requires_grad_(True)
    ours = token_logprobs(x, ids, temperature)
    grad_out = torch.randn(B, T, device=device)
    (ours * grad_out).sum().backward()

    x64 = logits.double().requires_grad_(True)
    exact = (x64 / temperature).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (exact * grad_out.double()).sum().backward()
    ref = reference.token_logprobs(logits, ids, temperature)

    assert ours.dtype == torch.float32 and ours.shape == (B, T)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_half_precision_inputs_compute_in_fp32(device):
    logits, ids = _inputs(2, 9, 1000, torch.float16, device, seed=3)
    ours = token_logprobs(logits, ids)
    exact = logits.double().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


def test_minus_inf_logits_and_ignored_ids(device):
    logits, ids = _inputs(1, 6, 1000, torch.float32, device, seed=4)
    logits[0, :, ::3] = -float("inf")  # e.g. top-k masking upstream
    ids[0, 0] = 3  # chosen token has -inf logit
    ids[0, 1] = 4
    ids[0, 2] = -100  # ignored
    logits[0, 5] = -float("inf")  # a whole row of -inf
    x = logits.clone().requires_grad_(True)
    ours = token_logprobs(x, ids)
    ours[:, 1:5].sum().backward()
    assert ours[0, 0] == -float("inf")
    assert ours[0, 2] == 0 and ours[0, 5] == -float("inf")
    x_ref = logits.clone().requires_grad_(True)
    ref = reference.token_logprobs(x_ref, ids)
    ref[:, 1:5].sum().backward()
    torch.testing.assert_close(ours[0, 1:5], ref[0, 1:5])
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0, 2] == 0).all()
    torch.testing.assert_close(x.grad[0, 1:5], x_ref.grad[0, 1:5])


def test_inplace_backward_writes_into_logits(device):
    logits, ids = _inputs(2, 5, 1000, torch.float32, device, seed=5)
    expected = torch.func.grad(lambda t: reference.token_logprobs(t, ids).sum())(logits)
    leaf = logits.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf, as lm_head output would be
    token_logprobs(work, ids, inplace_backward=True).sum().backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(work.detach(), expected, rtol=1e-5, atol=1e-6)  # storage reused


def test_empty_batch_and_shape_errors(device):
    with pytest.raises(ValueError, match="empty batch"):
        token_logprobs(torch.zeros(0, 4, 10, device=device), torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(torch.zeros(2, 4, 10, device=device), torch.zeros(2, 5, dtype=torch.long))


def test_rows_past_int32_offsets(device):
    """Row offsets past 2^31 elements: a strided view over a large, mostly untouched buffer."""
    V, stride = 1000, (1 << 31) + 64
    storage = torch.empty(stride + V, dtype=torch.float16, device=device)  # pages stay untouched
    logits = storage.as_strided((2, V), (stride, 1))
    logits.copy_(torch.randn(2, V))
    ids = torch.tensor([7, 999], device=device)
    ours = token_logprobs(logits, ids)
    exact = logits.double().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
