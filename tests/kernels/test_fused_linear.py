"""token_logprobs_from_hidden / grpo_loss_from_hidden against the reference (explicit logits)."""
import pytest
import torch

from rlpt_kernels import reference
from rlpt_kernels.fused_linear import grpo_loss_from_hidden, token_logprobs_from_hidden


def _inputs(B, T, H, V, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    with torch.no_grad():
        logp = reference.token_logprobs(hidden @ weight.t(), ids)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    return [t.to(device) for t in (hidden, weight, ids, adv, mask, old, ref)]


def _grads(fn, hidden, weight, *args, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fn(h, w, *args, **kw)
    return out, h, w


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("V", [1000, 4097])
def test_token_logprobs_from_hidden(chunk_size, V, device):
    hidden, weight, ids, *_ = _inputs(2, 13, 24, V, device, seed=V)
    ids[0, 3] = -100
    grad_out = torch.randn(2, 13, device=device)
    ours, h, w = _grads(token_logprobs_from_hidden, hidden, weight, ids, 0.8, chunk_size=chunk_size)
    (ours * grad_out).sum().backward()
    ref, hr, wr = _grads(reference.token_logprobs_from_hidden, hidden, weight, ids, 0.8)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_grpo_loss_from_hidden(loss_type, chunk_size, device):
    hidden, weight, ids, adv, mask, old, ref = _inputs(3, 11, 16, 1000, device, seed=len(loss_type))
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, loss_type=loss_type, temperature=1.2)
    (loss, stats), h, w = _grads(grpo_loss_from_hidden, hidden, weight, ids, adv, mask,
                                 chunk_size=chunk_size, **kw)
    (2.5 * loss).backward()  # the stored gradients are scaled by the incoming one
    (loss_r, stats_r), hr, wr = _grads(reference.grpo_loss_from_hidden, hidden, weight, ids, adv,
                                       mask, **kw)
    (2.5 * loss_r).backward()
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-6)
    assert stats == pytest.approx(stats_r, rel=1e-5, abs=1e-7)


def test_grpo_from_hidden_frozen_weight_and_fp64(device):
    hidden, weight, ids, adv, mask, old, ref = _inputs(2, 9, 16, 4097, device, seed=11)
    h = hidden.clone().requires_grad_(True)
    loss, _ = grpo_loss_from_hidden(h, weight, ids, adv, mask, old_logp=old, ref_logp=ref, beta=0.1)
    loss.backward()
    h64 = hidden.double().requires_grad_(True)
    loss64, _ = reference.grpo_loss(h64 @ weight.double().t(), ids, adv.double(), mask,
                                    old_logp=old.double(), ref_logp=ref.double(), beta=0.1)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


def test_all_masked_gives_zero_loss_and_gradients(device):
    hidden, weight, ids, adv, mask, old, ref = _inputs(2, 5, 8, 1000, device, seed=12)
    mask[:] = False
    (loss, stats), h, w = _grads(grpo_loss_from_hidden, hidden, weight, ids, adv, mask,
                                 old_logp=old, ref_logp=ref, beta=0.1)
    loss.backward()
    assert loss == 0 and (h.grad == 0).all() and (w.grad == 0).all()
    assert stats == {"kl": 0.0, "clip_ratio": 0.0}


def test_shape_errors_name_the_argument(device):
    hidden, weight, ids, adv, mask, *_ = _inputs(2, 5, 8, 100, device)
    with pytest.raises(ValueError, match="weight must be"):
        grpo_loss_from_hidden(hidden, weight[:, :4], ids, adv, mask)
    with pytest.raises(ValueError, match="empty batch"):
        token_logprobs_from_hidden(hidden[:0], weight, ids[:0])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(hidden, weight, ids, chunk_size=0)
