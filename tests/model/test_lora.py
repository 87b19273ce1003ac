"""LoRA: the layer's math on a toy module, then the adapter's round trips through peft and
transformers on tiny Qwen-VL checkpoints (fp32, CPU)."""
import json
import re

import pytest
import torch
from torch import nn

from rlpt_fast.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_disabled,
    apply_lora,
    lm_head_operands,
    lm_head_weight,
    lora_layers,
)
from rlpt_fast.model.lora_io import merge_lora


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


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": 2.0}, {"alpha": 0}, {"dropout": 1.0}, {"dropout": -0.1},
                                 {"target_modules": ()}, {"target_modules": "("}, {"dtype": torch.int8}])
def test_config_rejects_bad_values(bad):
    with pytest.raises((ValueError, re.error)):
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


def test_fp32_adapters_on_a_bf16_model_compute_in_bf16_and_get_fp32_gradients():
    model = Toy().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0))  # dtype defaults to float32
    _randomize_b(model)
    head = model.lm_head
    assert head.lora_A.weight.dtype == head.lora_B.weight.dtype == torch.float32
    out = model(torch.arange(11))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert head.lora_A.weight.grad.dtype == torch.float32 and head.lora_A.weight.grad.abs().sum() > 0
    h = torch.randn(3, 8, dtype=torch.bfloat16)
    expected = h.float() @ head.base_layer.weight.float().T + 2.0 * h.float() @ (head.lora_B.weight @ head.lora_A.weight).T
    torch.testing.assert_close(head(h).float(), expected, rtol=2e-2, atol=2e-2)


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


def test_load_adapter_names_the_tensor_that_does_not_fit(tmp_path):
    from rlpt_fast.model.lora_io import load_adapter, save_adapter

    model = Toy()
    apply_lora(model, LoRAConfig(r=2))
    save_adapter(model, tmp_path)
    other = Toy()
    apply_lora(other, LoRAConfig(r=3))
    with pytest.raises(ValueError, match=r"lora_A\.weight. has shape \(2, 8\), expected \(3, 8\)"):
        load_adapter(other, tmp_path)


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


# ---------------------------------------------------------------- our model, peft, transformers

# both architectures, untied and tied heads, transformers-5 and released key layouts
CASES = [("qwen2_5_vl", False, "new"), ("qwen2_vl", True, "old")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-tied{t}-{k}" for a, t, k in CASES])
def ckpt(request, tmp_path_factory):
    from rlpt_fast.testing import write_tiny_checkpoint

    arch, tie, layout = request.param
    return write_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, seed=1, tie_word_embeddings=tie,
                                 key_layout=layout)


def _inputs(model):
    """A prompt with one image: token ids (T,), pixel_values, image_grid_thw."""
    cfg, gen = model.config, torch.Generator().manual_seed(7)
    grid = torch.tensor([[1, 4, 6]])
    ids = torch.cat([torch.randint(0, 300, (5,), generator=gen), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((6,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.randint(0, 300, (7,), generator=gen)])
    return ids, torch.randn(24, cfg.vision.patch_dim, generator=gen), grid


def _ours(path):
    from rlpt_fast import load_model

    return load_model(path, dtype=torch.float32).eval()


def _theirs(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def _their_logits(model, ids, pixels, grid):
    # transformers 5 places M-RoPE from mm_token_type_ids (1 = image token), as its processor gives
    types = (ids == model.config.image_token_id).int()[None]
    with torch.no_grad():
        return model(input_ids=ids[None], pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types).logits[0]


@pytest.fixture(scope="module")
def adapted(ckpt):
    """Our model with LoRA (random B so the adapter matters) and its logits on _inputs."""
    model = _ours(ckpt)
    x = _inputs(model)
    with torch.no_grad():
        base = model.logits(*x)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05))
    _randomize_b(model, seed=2)
    with torch.no_grad():
        logits = model.logits(*x)
    assert (logits - base).abs().max() > 1e-2  # the adapter changes the function
    return model, x, base, logits


def test_adapter_disabled_is_our_base_model_exactly(adapted):
    model, x, base, _ = adapted
    with torch.no_grad(), adapter_disabled(model):
        assert torch.equal(model.logits(*x), base)
    assert len(list(lora_layers(model))) == 7 * model.config.num_hidden_layers + 1


def test_saved_adapter_loads_in_peft_with_the_same_logits_and_keys(adapted, ckpt, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    from rlpt_fast.model.lora_io import load_adapter, save_adapter

    model, x, _, logits = adapted
    save_adapter(model, tmp_path / "ours", ckpt)
    peft_model = PeftModel.from_pretrained(_theirs(ckpt), tmp_path / "ours").eval()
    torch.testing.assert_close(_their_logits(peft_model, *x), logits, rtol=0, atol=1e-4)
    # the keys are exactly those peft writes itself for the same targets
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = get_peft_model(_theirs(ckpt), LoraConfig(r=4, lora_alpha=8, target_modules=saved["target_modules"],
                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    theirs.save_pretrained(tmp_path / "peft")
    keys = [set(safe_open(str(d / "adapter_model.safetensors"), "pt").keys()) for d in (tmp_path / "ours", tmp_path / "peft")]
    assert keys[0] == keys[1]
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys[0]
    # and a peft-written adapter loads into ours with the same logits as in peft
    fresh = load_adapter(_ours(ckpt), tmp_path / "peft")
    theirs.eval()
    with torch.no_grad():
        expected = _their_logits(theirs, *x)
        assert (expected - fresh.logits(*x)).abs().max() < 1e-4 < (expected - adapted[2]).abs().max()
    roundtrip = load_adapter(_ours(ckpt), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(roundtrip.logits(*x), logits)


def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(adapted, ckpt, tmp_path):
    from safetensors import safe_open

    from rlpt_fast.model.lora_io import save_merged

    model, x, _, logits = adapted
    out = save_merged(model, ckpt, tmp_path / "merged")
    assert {f.name for f in ckpt.iterdir()} <= {f.name for f in out.iterdir()}
    keys = [set(safe_open(str(d / "model.safetensors"), "pt").keys()) for d in (ckpt, out)]
    assert keys[1] == keys[0] | {"lm_head.weight"}  # the checkpoint's own layout; a LoRA head is written
    torch.testing.assert_close(_their_logits(_theirs(out), *x), logits, rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(_ours(out).logits(*x), logits, rtol=0, atol=1e-4)
    if model.config.tie_word_embeddings:  # the head's adapter unties it: the embeddings keep no adapter
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_config.json").write_text("{oops"), r"adapter_config\.json: not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text("[]"), r"adapter_config\.json: must hold a JSON object"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA"}'), r"adapter_config\.json: .*'r'"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x07" * 64),
     r"adapter_model\.safetensors: unreadable"),
    (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), r"adapter_model\.bin.*pickle"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), r"no adapter_model\.safetensors"),
])
def test_load_adapter_damaged_directory_names_the_file(tmp_path, damage, message):
    """ValueError naming the file (FileNotFoundError when the weights are absent, as load_model)."""
    from rlpt_fast.model.lora_io import load_adapter, save_adapter

    model = Toy()
    apply_lora(model, LoRAConfig(r=2))
    save_adapter(model, tmp_path)
    damage(tmp_path)
    absent = not any(tmp_path.glob("adapter_model.*"))
    with pytest.raises(FileNotFoundError if absent else ValueError, match=message):
        load_adapter(Toy(), tmp_path)
