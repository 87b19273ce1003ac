"""grpo_loss (Triton, in the interpreter on CPU) against the torch reference, fp64 and TRL."""
import itertools

import pytest
import torch

from rlpt_kernels import reference
from rlpt_kernels.grpo_loss import grpo_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def _batch(B, T, V, device, seed=0, old_spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    adv = torch.randn(B, generator=g)
    adv[0] = abs(adv[0]) + 0.1  # both signs present
    if B > 1:
        adv[1] = -abs(adv[1]) - 0.1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = logp + old_spread * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    return to(logits), to(ids), to(adv), to(mask), to(old), to(ref)


def _run(fn, logits, *args, **kw):
    x = logits.clone().requires_grad_(True)
    loss, stats = fn(x, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("loss_type,kl", list(itertools.product(LOSS_TYPES, ["k1", "k2", "k3"])))
def test_every_loss_and_kl_type_matches_reference(loss_type, kl, device):
    logits, ids, adv, mask, old, ref = _batch(3, 37, 1000, device, seed=len(loss_type) + len(kl))
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, kl=kl, loss_type=loss_type,
              temperature=0.9, max_completion_length=40)
    loss, grad, stats = _run(grpo_loss, logits, ids, adv, mask, **kw)
    loss_r, grad_r, stats_r = _run(reference.grpo_loss, logits, ids, adv, mask, **kw)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_r, rtol=1e-4, atol=1e-7)
    assert stats == pytest.approx(stats_r, rel=1e-5, abs=1e-7)
    assert 0 < stats["clip_ratio"] < 1


@pytest.mark.parametrize("V,T", [(4097, 1), (4097, 128), (1000, 37)])
def test_matches_fp64(V, T, device):
    logits, ids, adv, mask, old, ref = _batch(2, T, V, device, seed=V + T)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.1, eps_low=0.2, eps_high=0.28)
    loss, grad, _ = _run(grpo_loss, logits, ids, adv, mask, **kw)
    kw64 = dict(kw, old_logp=old.double(), ref_logp=ref.double())
    x64 = logits.double().requires_grad_(True)
    loss64, _ = reference.grpo_loss(x64, ids, adv.double(), mask, **kw64)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_on_policy_has_ratio_one_and_plain_policy_gradient(device):
    logits, ids, adv, mask, _, _ = _batch(2, 9, 1000, device, seed=1)
    loss, grad, stats = _run(grpo_loss, logits, ids, adv, mask)
    # Plain policy gradient: loss = -mean_b(A_b * mean_t logp)'s gradient, value -mean_b(A_b).
    x = logits.clone().requires_grad_(True)
    logp = reference.token_logprobs(x, ids)
    m = mask.float()
    pg = -((adv[:, None] * logp * m).sum(-1) / m.sum(-1)).mean()
    pg.backward()
    torch.testing.assert_close(loss, -adv.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-7)
    assert stats == {"kl": 0.0, "clip_ratio": 0.0}


def test_ratios_far_outside_clip_range(device):
    logits, ids, adv, mask, old, _ = _batch(4, 16, 1000, device, seed=2, old_spread=4.0)
    loss, grad, stats = _run(grpo_loss, logits, ids, adv, mask, old_logp=old)
    loss_r, grad_r, stats_r = _run(reference.grpo_loss, logits, ids, adv, mask, old_logp=old)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_r, rtol=1e-4, atol=1e-6)
    assert stats["clip_ratio"] == pytest.approx(stats_r["clip_ratio"]) and stats["clip_ratio"] > 0.2


def test_beta_zero_or_no_ref_skips_kl(device):
    logits, ids, adv, mask, old, ref = _batch(2, 8, 1000, device, seed=3)
    base, _, s0 = _run(grpo_loss, logits, ids, adv, mask, old_logp=old)
    no_beta, _, s1 = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, ref_logp=ref, beta=0.0)
    no_ref, _, s2 = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, beta=0.5)
    assert base == no_beta == no_ref and s0["kl"] == s1["kl"] == s2["kl"] == 0.0


def test_fully_masked_sequences_give_no_nan(device):
    logits, ids, adv, mask, old, ref = _batch(3, 10, 1000, device, seed=4)
    mask[1] = False
    logits[1] = -float("inf")  # garbage under the mask must not leak
    old[1] = float("nan")
    ids[1] = -100
    for lt in LOSS_TYPES:
        loss, grad, stats = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, ref_logp=ref,
                                 beta=0.1, loss_type=lt)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert (grad[1] == 0).all()
        assert all(v == v for v in stats.values())
    mask[:] = False
    loss, grad, stats = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, ref_logp=ref, beta=0.1)
    assert loss == 0 and (grad == 0).all() and stats == {"kl": 0.0, "clip_ratio": 0.0}


def test_dapo_uses_num_items_in_batch(device):
    logits, ids, adv, mask, old, _ = _batch(2, 8, 1000, device, seed=5)
    local, _, _ = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, loss_type="dapo")
    total = float(mask.sum()) * 3  # as if two more micro-batches of the same size
    accum, _, _ = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, loss_type="dapo",
                       num_items_in_batch=total)
    torch.testing.assert_close(accum * 3, local)


def test_inplace_backward(device):
    logits, ids, adv, mask, old, ref = _batch(2, 8, 1000, device, seed=6)
    _, expected, _ = _run(reference.grpo_loss, logits, ids, adv, mask, old_logp=old)
    leaf = logits.clone().requires_grad_(True)
    loss, _ = grpo_loss(leaf * 1.0, ids, adv, mask, old_logp=old, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-4, atol=1e-7)


def test_bad_inputs_are_named(device):
    logits, ids, adv, mask, old, ref = _batch(2, 8, 100, device)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logits, ids, adv[:1], mask)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logits, ids, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="kl must be"):
        grpo_loss(logits, ids, adv, mask, kl="k4")
    with pytest.raises(ValueError, match="empty batch"):
        grpo_loss(logits[:0], ids[:0], adv[:0], mask[:0])
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logits, ids, adv, mask, ref_logp=ref[:, :3], beta=0.1)


def test_row_offsets_past_int32(device):
    """Rows x vocab beyond 2^31 with a contiguous int32-sized stride: only the last row is active."""
    V, T = 1 << 20, 2049  # T * V = 2^31 + 2^20 elements (4 GiB of fp16, never touched but one row)
    logits = torch.empty(1, T, V, dtype=torch.float16, device=device)
    logits[0, -1] = torch.randn(V).to(torch.float16)
    ids = torch.zeros(1, T, dtype=torch.long, device=device)
    ids[0, -1] = V - 5
    mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    mask[0, -1] = True
    adv = torch.ones(1, device=device)
    loss, _ = grpo_loss(logits, ids, adv, mask)
    assert loss.item() == pytest.approx(-1.0)
    # k1 KL = logp - ref_logp on the one active row: reads the row past 2^31 elements correctly
    logp = logits[0, -1].double().log_softmax(-1)[V - 5]
    ref_logp = torch.full((1, T), float(logp) + 0.5, device=device)
    _, stats = grpo_loss(logits, ids, adv, mask, ref_logp=ref_logp, beta=1.0, kl="k1")
    assert stats["kl"] == pytest.approx(-0.5, abs=1e-3)


trl = pytest.importorskip("trl", reason="TRL parity needs trl (in the test extra)")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_same_values_as_trl_grpo_trainer(loss_type, device):
    """Calls TRL's own GRPOTrainer._compute_loss with its model forward replaced by our logits."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    logits, ids, adv, mask, old, ref = _batch(3, 12, 1000, device, seed=7)
    beta, eps_low, eps_high, max_len = 0.04, 0.2, 0.28, 12
    x = logits.clone().requires_grad_(True)

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kw):
        logp = x.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return logp, torch.zeros_like(logp), None

    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True,
                                  reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                                  gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=accelerator, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": ids[:, :0], "prompt_mask": mask[:, :0], "completion_ids": ids,
              "completion_mask": mask.int(), "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    trl_loss = GRPOTrainer._compute_loss(fake, None, inputs)
    trl_loss.backward()

    ours, grad, stats = _run(grpo_loss, logits, ids, adv, mask, old_logp=old, ref_logp=ref,
                             beta=beta, eps_low=eps_low, eps_high=eps_high, loss_type=loss_type,
                             max_completion_length=max_len)
    torch.testing.assert_close(ours, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-7)
    assert stats["kl"] == pytest.approx(fake._metrics["train"]["kl"][-1], rel=1e-5)
    assert stats["clip_ratio"] == pytest.approx(
        fake._metrics["train"]["clip_ratio/region_mean"][-1], rel=1e-5)
