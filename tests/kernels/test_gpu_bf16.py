"""bf16 on a GPU at Qwen's vocabulary (151,936): our error against fp64 must be at most twice
the error of the same computation done by plain torch in bf16. Runs only where CUDA is present
(benchmarks/gpu_sweep.sh runs it on the device)."""
import pytest
import torch

import rlpt_kernels
from rlpt_kernels import reference

pytestmark = pytest.mark.gpu
V = 151936


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a.double() - b).norm() / b.norm()).item()


def _data(N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(N, V, device="cuda", generator=g) * 4).to(torch.bfloat16)
    ids = torch.randint(0, V, (N,), device="cuda", generator=g)
    return logits, ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_bf16(temperature):
    logits, ids = _data(257)
    grad_out = torch.randn(257, device="cuda")
    x64 = logits.double().requires_grad_(True)
    exact = reference.token_logprobs(x64, ids, temperature)
    (exact * grad_out.double()).sum().backward()

    x = logits.clone().requires_grad_(True)
    ours = rlpt_kernels.token_logprobs(x, ids, temperature)
    (ours * grad_out).sum().backward()

    xb = logits.clone().requires_grad_(True)
    plain = (xb / temperature).log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    (plain.float() * grad_out).sum().backward()

    assert _rel(ours, exact) <= 2 * _rel(plain.float(), exact)
    assert _rel(x.grad, x64.grad) <= 2 * _rel(xb.grad, x64.grad)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_loss_bf16(loss_type):
    B, T = 4, 64
    logits, ids = _data(B * T, seed=1)
    logits, ids = logits.view(B, T, V), ids.view(B, T)
    g = torch.Generator(device="cuda").manual_seed(2)
    adv = torch.randn(B, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.2
    with torch.no_grad():
        logp = reference.token_logprobs(logits, ids)
    old = logp + 0.2 * torch.randn(B, T, device="cuda", generator=g)
    ref = logp + 0.1 * torch.randn(B, T, device="cuda", generator=g)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, loss_type=loss_type)

    x64 = logits.double().requires_grad_(True)
    exact, _ = reference.grpo_loss(x64, ids, adv.double(), mask, **dict(
        kw, old_logp=old.double(), ref_logp=ref.double()))
    exact.backward()
    x = logits.clone().requires_grad_(True)
    ours, _ = rlpt_kernels.grpo_loss(x, ids, adv, mask, **kw)
    ours.backward()
    # plain torch in bf16: the logits' log_softmax in bf16, the rest as TRL does it
    xb = logits.clone().requires_grad_(True)
    lp = xb.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    plain, _ = _grpo_from_bf16_logp(lp, adv, mask, old, ref, loss_type)
    plain.backward()
    assert abs(ours.item() - exact.item()) <= 2 * abs(plain.item() - exact.item()) + 1e-6
    assert _rel(x.grad, x64.grad) <= 2 * _rel(xb.grad, x64.grad)


def _grpo_from_bf16_logp(lp, adv, mask, old, ref, loss_type, beta=0.04):
    """TRL's formulas evaluated in the log-probs' own (bf16) precision."""
    from rlpt_kernels.config import GRPOLossConfig
    from rlpt_kernels.reference import _grpo_from_logp

    cast = lambda t: None if t is None else t.to(lp.dtype)  # noqa: E731
    cfg = GRPOLossConfig(beta=beta, loss_type=loss_type)
    return _grpo_from_logp(lp, cast(adv), mask, cast(old), cast(ref), cfg)


def test_grpo_loss_from_hidden_bf16():
    B, T, H = 4, 64, 1024
    g = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(B, T, H, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H**0.5 * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.2
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    exact, _ = reference.grpo_loss(h64 @ w64.t(), ids, adv.double(), mask)
    exact.backward()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ours, _ = rlpt_kernels.grpo_loss_from_hidden(h, w, ids, adv, mask, chunk_size=96)
    ours.backward()
    hb, wb = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = (hb @ wb.t()).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    plain, _ = _grpo_from_bf16_logp(lp, adv, mask, None, None, "grpo", beta=0.0)
    plain.backward()
    assert abs(ours.item() - exact.item()) <= 2 * abs(plain.item() - exact.item()) + 1e-6
    assert _rel(h.grad, h64.grad) <= 2 * _rel(hb.grad, h64.grad)
    assert _rel(w.grad, w64.grad) <= 2 * _rel(wb.grad, w64.grad)
