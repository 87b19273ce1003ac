"""LoRA: the layer's math on a toy module, then the adapter's round trips through peft and
transformers on tiny Qwen-VL checkpoints (fp32, CPU)."""
import json

import pytest
import torch
from torch import nn

from rlpt_fast.model.lora import (LoRAConfig, LoRALinear, adapter_disabled, apply_lora, lm_head_operands,
                                  lm_head_weight, lora_layers, merge_lora)


class Toy(nn.Module):
    """The name structure that matters: a vision tower, decoder Linears, a (tied) head."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.model = nn.Module()
        self.model.visual = nn.Module()
        self.model.visual.proj = nn.Linear(8, 8)
        self.model.language_model = nn.Module()
        self.model.language_model.embed_tokens = nn.Embedding(11, 8)
        self.model.language_model.q_proj = nn.Linear(8, 8)
        self.model.language_model.up_proj = nn.Linear(8, 6, bias=False)
        self.lm_head = nn.Linear(8, 11, bias=False)
        if tie:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def forward(self, ids):
        lm = self.model.language_model
        x = lm.embed_tokens(ids)
        x = x + lm.q_proj(x) + lm.up_proj(x).sum(-1, keepdim=True)
        return self.lm_head(x)


def _randomize_b(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.0), dict(alpha=0), dict(dropout=1.0),
                                 dict(dropout=-0.1), dict(target_modules=()), dict(target_modules="(")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(Exception):
        LoRAConfig(**bad)


def test_default_targets_every_linear_outside_vision_and_freezes_base():
    model = Toy()
    names = apply_lora(model, LoRAConfig(r=2, alpha=4))
    assert names == ["model.language_model.q_proj", "model.language_model.up_proj", "lm_head"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.lora_{ab}.weight" for n in names for ab in "AB")
    assert type(model.model.visual.proj) is nn.Linear
    assert apply_lora(Toy(), LoRAConfig(r=2, target_modules=("q_proj",))) == ["model.language_model.q_proj"]
    assert apply_lora(Toy(), LoRAConfig(r=2, target_modules=r".*up_proj")) == ["model.language_model.up_proj"]


def test_forward_is_base_plus_scaled_low_rank_and_dropout_only_in_train():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = LoRALinear(base, r=3, alpha=6.0, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    expected = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    layer.eval()
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.allclose(layer(x), expected)  # dropout on: a different function
    with adapter_disabled(layer):
        assert torch.equal(layer(x), base(x))
    assert not layer.disabled


def test_wrapping_an_eval_model_keeps_dropout_off():
    model = Toy().eval()
    apply_lora(model, LoRAConfig(r=2, dropout=0.5))
    _randomize_b(model)
    ids = torch.arange(11)
    assert torch.equal(model(ids), model(ids))


@pytest.mark.parametrize("tie", [False, True])
def test_adapter_disabled_is_the_base_model_exactly(tie):
    model = Toy(tie).eval()
    ids = torch.arange(11)
    before = model(ids)
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    _randomize_b(model)
    assert not torch.allclose(model(ids), before)
    with adapter_disabled(model):
        assert torch.equal(model(ids), before)


def test_lm_head_weight_and_operands_match_the_module_with_gradients():
    model = Toy()
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.3))
    _randomize_b(model)
    head = model.lm_head
    h = torch.randn(6, 8)
    grads = []
    for mode in ("module", "weight", "operands"):
        torch.manual_seed(5)  # the same dropout draw for module and operands
        if mode == "module":
            model.eval()
            out = head(h)
            model.train()
        elif mode == "weight":
            out = h @ lm_head_weight(model).T
        else:
            model.eval()
            hh, ww = lm_head_operands(model, h)
            out = hh @ ww.T
        out.pow(2).sum().backward()
        grads.append((out.detach(), head.lora_A.weight.grad.clone(), head.lora_B.weight.grad.clone()))
        head.lora_A.weight.grad = head.lora_B.weight.grad = None
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)
    # with dropout on, operands reproduce the module's dropout draw exactly
    model.train()
    torch.manual_seed(9)
    hh, ww = lm_head_operands(model, h)
    torch.manual_seed(9)
    torch.testing.assert_close(hh @ ww.T, head(h))
    with adapter_disabled(model):
        assert lm_head_weight(model) is head.base_layer.weight


@pytest.mark.parametrize("tie", [False, True])
def test_merge_folds_adapter_and_leaves_tied_embeddings_alone(tie):
    model = Toy(tie).eval()
    embed = model.model.language_model.embed_tokens.weight.detach().clone()
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    _randomize_b(model)
    ids = torch.arange(11)
    expected = model(ids)
    merge_lora(model)
    assert not any(True for _ in lora_layers(model))
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.model.language_model.embed_tokens.weight, embed)
