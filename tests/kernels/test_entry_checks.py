"""Every public op refuses what its docstring rules out with a ValueError naming the argument,
on both backends (the Triton launchers and the torch reference run the same checks), before any
kernel runs; so these are quick even in Triton's interpreter."""
import sys

import pytest
import torch

from rlpt_kernels import reference

TRITON = {name: sys.modules[f"rlpt_kernels.{module}"] for name, module in [
    ("token_logprobs", "token_logprobs"), ("token_logprobs_from_hidden", "fused_linear"),
    ("grpo_loss", "grpo_loss"), ("grpo_loss_from_hidden", "fused_linear"),
    ("group_advantages", "group_advantages")]}


@pytest.fixture(params=["triton", "reference"])
def op(request):
    """op(name) -> that op's implementation on the backend under test."""
    return lambda name: getattr(TRITON[name] if request.param == "triton" else reference, name)


def _batch(B=2, T=3, V=11, H=4):
    g = torch.Generator().manual_seed(0)
    return dict(logits=torch.randn(B, T, V, generator=g), ids=torch.randint(0, V, (B, T), generator=g),
                hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g),
                adv=torch.randn(B, generator=g), mask=torch.ones(B, T, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_temperature_must_be_positive(op, temperature):
    b = _batch()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        op("token_logprobs")(b["logits"], b["ids"], temperature)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        op("token_logprobs_from_hidden")(b["hidden"], b["weight"], b["ids"], temperature)


def test_token_ids_must_be_integers(op):
    b = _batch()
    with pytest.raises(ValueError, match="token_ids must hold integers, got torch.float32"):
        op("token_logprobs")(b["logits"], b["ids"].float())
    with pytest.raises(ValueError, match="token_ids must hold integers"):
        op("grpo_loss")(b["logits"], b["ids"].float(), b["adv"], b["mask"])
    with pytest.raises(ValueError, match="token_ids must hold integers"):
        op("grpo_loss_from_hidden")(b["hidden"], b["weight"], b["ids"].float(), b["adv"], b["mask"])


def test_logits_and_hidden_must_be_floating_point(op):
    b = _batch()
    with pytest.raises(ValueError, match="logits must be floating point, got torch.int64"):
        op("token_logprobs")(b["ids"][..., None].expand(-1, -1, 5), b["ids"])
    with pytest.raises(ValueError, match="hidden must be floating point"):
        op("token_logprobs_from_hidden")(b["hidden"].long(), b["weight"].long(), b["ids"])


def test_hidden_and_weight_must_share_a_dtype(op):
    b = _batch()
    with pytest.raises(ValueError, match=r"weight .*torch.float64.* hidden's dtype torch.float32"):
        op("token_logprobs_from_hidden")(b["hidden"], b["weight"].double(), b["ids"])
    with pytest.raises(ValueError, match="hidden's dtype"):
        op("grpo_loss_from_hidden")(b["hidden"], b["weight"].double(), b["ids"], b["adv"], b["mask"])


def test_arguments_on_another_device_are_named(op):
    b = _batch()
    with pytest.raises(ValueError, match=r"token_ids is on meta.*logits.* on cpu"):
        op("token_logprobs")(b["logits"], b["ids"].to("meta"))
    with pytest.raises(ValueError, match=r"advantages is on meta"):
        op("grpo_loss")(b["logits"], b["ids"], b["adv"].to("meta"), b["mask"])
    with pytest.raises(ValueError, match=r"weight is on meta"):
        op("token_logprobs_from_hidden")(b["hidden"], b["weight"].to("meta"), b["ids"])


def test_int32_token_ids_give_the_int64_result(op):
    b = _batch()
    expected = reference.token_logprobs(b["logits"], b["ids"])
    torch.testing.assert_close(op("token_logprobs")(b["logits"], b["ids"].int()), expected)
    loss, _ = op("grpo_loss")(b["logits"], b["ids"].int(), b["adv"], b["mask"])
    torch.testing.assert_close(loss, reference.grpo_loss(b["logits"], b["ids"], b["adv"], b["mask"])[0])


@pytest.mark.parametrize("group_size", [2.0, True, "2"])
def test_group_size_must_be_an_int(op, group_size):
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        op("group_advantages")(torch.zeros(4), group_size)
