"""Trainer.step end to end on a tiny model, checked against a plain unpacked computation."""
import math

import pytest
import torch

from rlpt_fast.model import load_model
from rlpt_fast.model.lora import adapter_disabled, lora_layers
from rlpt_fast.train import trainer as trainer_mod
from rlpt_fast.train.loss import reference_logprobs
from rlpt_fast.train.scoring import RewardError
from rlpt_fast.train.trainer import NonFiniteLossError, Trainer

STEP_KEYS = {"step", "epoch", "lr", "loss", "kl", "clip_ratio", "grad_norm", "skipped", "nonfinite_streak",
             "reward_mean", "reward_std", "groups_zero_std", "completion_length_mean", "completion_length_min",
             "completion_length_max", "truncated_frac", "preemptions", "rollout_tokens_per_s",
             "train_tokens_per_s", "time_rollout", "time_reward", "time_reference", "time_train",
             "time_optimizer", "time_step", "peak_memory_mb"}


def dense_logprobs(model, rollout, temperature=1.0) -> torch.Tensor:
    """Log-probs of each completion token from an unpacked dense forward of [prompt; completion]."""
    p = rollout.prompt
    out = []
    for c in rollout.completions:
        ids = torch.cat([p.input_ids, torch.tensor(c)])
        logits = model.logits(ids, p.pixel_values, p.image_grid_thw)[p.input_ids.numel() - 1:-1]
        out.append(torch.log_softmax(logits.float() / temperature, -1).gather(1, torch.tensor(c)[:, None])[:, 0])
    return torch.cat(out)


def perturb_lora(model, seed=0, scale=0.05):
    """Non-zero adapters, so the policy differs from the reference and KL is not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_step_matches_unpacked_reference_and_logs_every_metric(make_config):
    tr = Trainer(make_config("--lora.dropout=0", "--train.prompts_per_step=1", "--train.grad_accum=2"))
    perturb_lora(tr.model)
    before = lora_state(tr.model)
    base_before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" not in n}
    m = tr.step()
    assert STEP_KEYS <= set(m) and any(k.startswith("reward/") for k in m)
    assert m["step"] == 1 and not m["skipped"] and m["lr"] == pytest.approx(5e-3)
    after = lora_state(tr.model)
    rollouts = tr.last_rollouts
    assert len(rollouts) == 2 and all(len(r.completions) == 4 for r in rollouts)

    # the same loss, unpacked and dense, at the pre-step weights
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if n in before:
                p.copy_(before[n])
    tr.model.eval()
    for n, p in tr.model.named_parameters():
        if n in before:
            p.grad = None
    losses, kls, ntok = [], 0.0, 0
    for r in rollouts:
        logp = dense_logprobs(tr.model, r)
        with adapter_disabled(tr.model), torch.no_grad():
            ref = dense_logprobs(tr.model, r)
        d = ref - logp
        kl = torch.exp(d) - d - 1
        adv = r.advantages.repeat_interleave(torch.tensor(r.lengths))
        per_tok = -adv * torch.exp(logp - logp.detach()) + 0.04 * kl
        seq_means = torch.stack([t.mean() for t in per_tok.split(r.lengths)])
        losses.append(seq_means.mean())
        kls, ntok = kls + kl.sum().item(), ntok + kl.numel()
        assert torch.equal(torch.tensor(r.rewards), torch.tensor([(len(t) % 3) / 2 for t in r.texts]))
    loss = torch.stack(losses).mean()  # grad_accum 2 of one group each
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    assert m["kl"] == pytest.approx(kls / ntok, rel=1e-3)  # mean of per-micro-batch token means
    loss.backward()
    params = [p for n, p in tr.model.named_parameters() if n in before]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert m["grad_norm"] == pytest.approx(norm.item(), rel=1e-3)
    clip = min(1.0, 1.0 / (norm.item() + 1e-6))
    for n, p in tr.model.named_parameters():
        if n in before:  # AdamW's first update: lr * g / (|g| + eps), g clipped
            g = p.grad * clip
            expected = -5e-3 * g / (g.abs() + 1e-8)
            torch.testing.assert_close(after[n] - before[n], expected, atol=5e-6, rtol=1e-3)
    assert any((after[n] - before[n]).abs().max() > 1e-4 for n in before)
    for n, p in tr.model.named_parameters():  # the frozen base did not move
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_reference_logprobs_are_the_base_models(make_config, ckpt):
    tr = Trainer(make_config("--grpo.beta=0"))
    perturb_lora(tr.model, seed=1)
    tr.step()
    base = load_model(ckpt)
    rollouts = tr.last_rollouts
    got = reference_logprobs(tr.model, rollouts, 1.0)
    for r, ref in zip(rollouts, got):
        with torch.no_grad():
            torch.testing.assert_close(ref, dense_logprobs(base, r), atol=2e-5, rtol=1e-5)
            policy = dense_logprobs(tr.model.eval(), r)
        assert (policy - ref).abs().max() > 1e-3  # the adapter really is on outside the context


def test_non_finite_loss_skips_then_aborts(make_config, monkeypatch):
    tr = Trainer(make_config("--train.max_nonfinite=2"))
    real = trainer_mod.policy_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(trainer_mod, "policy_loss", nan_loss)
    before = lora_state(tr.model)
    m = tr.step()
    assert m["skipped"] and m["nonfinite_streak"] == 1 and math.isnan(m["loss"])
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters() if n in before)
    assert tr.optimizer.state == {} or all(not s for s in tr.optimizer.state.values())
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps had a non-finite loss") as e:
        tr.step()
    assert e.value.metrics["step"] == 2
    monkeypatch.setattr(trainer_mod, "policy_loss", real)
    tr.cfg.train.max_nonfinite = 5
    m = tr.step()  # a finite step resets the streak
    assert not m["skipped"] and m["nonfinite_streak"] == 0


def test_reward_exception_names_the_row(make_config):
    def broken(row, text, prompt):
        if row.method == "yes_no":
            raise KeyError("no answer key")
        return 0.5
    tr = Trainer(make_config("--train.prompts_per_step=4"), reward_fn=broken)
    with pytest.raises(RewardError) as e:
        tr.step()
    msg = str(e.value)
    assert "train.jsonl:line" in msg and "'yes_no'" in msg and "KeyError" in msg
    assert isinstance(e.value.__cause__, KeyError)


def test_prompt_longer_than_the_engine_takes_names_the_row(make_config):
    tr = Trainer(make_config("--engine.max_model_len=64"))
    with pytest.raises(ValueError, match=r"train\.jsonl:line \d+: its prompt has \d+ tokens, engine.max_model_len is 64"):
        tr.step()


def test_mu_keeps_old_logprobs_from_the_first_pass(make_config):
    tr = Trainer(make_config("--lora.dropout=0", "--grpo.mu=2", "--grpo.beta=0"))
    perturb_lora(tr.model, seed=2)
    before = lora_state(tr.model)
    m = tr.step()
    assert tr.state.updates == 2 and not m["skipped"]
    after = lora_state(tr.model)
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if n in before:
                p.copy_(before[n])
        for r in tr.last_rollouts:
            torch.testing.assert_close(r.old_logp, dense_logprobs(tr.model.eval(), r), atol=2e-5, rtol=1e-5)
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_full_fine_tuning_trains_the_decoder_not_the_vision_tower(make_config):
    tr = Trainer(make_config("--lora.enabled=false", "--optim.lr=1e-3"))
    assert not list(lora_layers(tr.model)) and tr.ref_model is not None
    names = set(tr.param_names)
    assert not any("visual" in n for n in names) and "lm_head.weight" in names
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.step()
    assert not m["skipped"] and m["kl"] == 0.0  # first step: policy == reference
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert "lm_head.weight" in moved and not any("visual" in n for n in moved)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grad_accumulation_equals_one_big_batch(make_config, loss_type):
    """Same rollouts (seeded by step and prompt index), so 2 micro-batches of 1 prompt must give
    the gradient of 1 batch of 2 prompts (dapo: normalized by the whole accumulated batch).
    Compared: the gradients the optimizer gets, not the weights after it: Adam's first step moves a
    weight by lr * g / (|g| + eps), so where g is near eps a rounding-level difference in g (the
    two orders of summation) moves the weight by a visible fraction of lr (seen: 0.2% of lr, one
    element of 1,024, on one machine's CPU and not on another's)."""
    after = []
    for pps, accum in ((2, 1), (1, 2)):
        tr = Trainer(make_config("--lora.dropout=0", f"--grpo.loss_type={loss_type}",
                                 f"--train.prompts_per_step={pps}", f"--train.grad_accum={accum}"))
        perturb_lora(tr.model, seed=3)
        grads = record_gradients(tr)
        m = tr.step()
        after.append((m, grads, [r.completions for r in tr.last_rollouts]))
    (m1, g1, c1), (m2, g2, c2) = after
    assert c1 == c2
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    assert g1.keys() == g2.keys() and any("lora_" in n for n in g1)
    scale = max(g.abs().max().item() for g in g1.values())
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5 * scale, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def record_gradients(trainer) -> dict[str, torch.Tensor]:
    """The (clipped) gradients handed to each optimizer step, by parameter name (filled in place)."""
    grads, step = {}, trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in zip(trainer.param_names, trainer.params)
                      if p.grad is not None})
        return step(*args, **kwargs)
    trainer.optimizer.step = recording_step
    return grads


def test_a_step_hashes_each_prompt_image_once(make_config, monkeypatch):
    """The trainer encodes the step's images and the engine is handed the same tensors: their
    content keys are computed once (model._image_keys), not again by the engine."""
    import rlpt_fast.model.model as model_module

    tr = Trainer(make_config("--train.prompts_per_step=2"))
    hashed = []
    real = model_module._image_key
    monkeypatch.setattr(model_module, "_image_key", lambda p, g: hashed.append(g) or real(p, g))
    encoded = []
    real_encode = tr.model.encode_images
    monkeypatch.setattr(tr.model, "encode_images", lambda px, grid: encoded.append(len(grid)) or real_encode(px, grid))
    tr.step()
    images = sum(len(r.prompt.image_grid_thw) for r in tr.last_rollouts if r.prompt.pixel_values is not None)
    assert images > 0 and len(encoded) >= 2 * len(tr.last_rollouts)  # trainer and engine both encode
    assert len(hashed) == images
