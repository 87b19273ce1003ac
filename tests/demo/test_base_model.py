"""The warm start's pieces at tiny size: the padded causal attention and caption loss against
the project's packed training forward, the base checkpoint round trip, and that a short warm
start learns the caption language."""
import pytest
import torch

from rlpt_fast.demo.base_model import (BaseModelConfig, WeightAverage, caption_ids, save_checkpoint,
                                       scene_prompt, warm_start, write_random_checkpoint)
from rlpt_fast.demo.teacher_forcing import caption_loss, padded_causal_attention
from rlpt_fast.demo.world import build_world, caption
from rlpt_fast.model import load_model
from rlpt_fast.model.attention import causal_attention
from rlpt_fast.model.packing import Group, packed_forward
from rlpt_fast.prompts import PromptBuilder

TINY = BaseModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vision_hidden_size=16, steps=40, batch=8, lr=5e-3,
                       personal_rate=0.2, ema=0.9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_base")
    dw = build_world(root / "world", seed=1, n_concepts=4, n_scenes=24)
    ckpt = write_random_checkpoint(root / "random", dw, TINY, seed=0)
    return dw, ckpt, root


def test_padded_causal_attention_equals_per_sequence_sdpa():
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 9, 3]
    n = sum(lens)
    q, k, v = (torch.randn(n, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 15, 18])
    up = torch.randn(n, 4, 8, generator=g)
    ref = causal_attention(cu)(0, q, k, v)
    ref_grads = torch.autograd.grad((ref * up).sum(), (q, k, v))
    out = padded_causal_attention(cu)(0, q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # the padding (copies of the last token) must not leak gradient into real keys and values
    for got, want in zip(torch.autograd.grad((out * up).sum(), (q, k, v)), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_caption_loss_equals_packed_forward(setup):
    dw, ckpt, _ = setup
    torch.manual_seed(0)
    model, b = load_model(ckpt), PromptBuilder(ckpt)
    scenes = dw.train_scenes[:3]
    prompts = [scene_prompt(b, dw, sc, i) for i, sc in enumerate(scenes)]
    caps = [caption_ids(b, caption(dw.world, sc, i == 1)) for i, sc in enumerate(scenes)]
    hidden, packed = packed_forward(model, [Group(p.input_ids, [c], p.pixel_values, p.image_grid_thw)
                                            for p, c in zip(prompts, caps)])
    ref = torch.nn.functional.cross_entropy(model.compute_logits(hidden).float(), packed.target_ids)
    torch.testing.assert_close(caption_loss(model, prompts, caps), ref, rtol=1e-5, atol=1e-5)
    assert caps[0][-1].item() == b.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_warm_start_learns_captions_and_saves_a_loadable_checkpoint(setup):
    dw, ckpt, root = setup
    torch.manual_seed(0)
    model, b = load_model(ckpt), PromptBuilder(ckpt)
    losses = warm_start(model, b, dw, TINY, seed=0, log=lambda s: None)
    assert len(losses) == TINY.steps
    assert losses[0] > 4.0 and sum(losses[-5:]) / 5 < 0.5 * losses[0]
    out = save_checkpoint(model, ckpt, root / "base")
    again = load_model(out)
    p = scene_prompt(b, dw, dw.eval_scenes[0], 0)
    torch.testing.assert_close(again.logits(p.input_ids, p.pixel_values, p.image_grid_thw),
                               model.logits(p.input_ids, p.pixel_values, p.image_grid_thw))
    assert not any(p.requires_grad for p in again.model.visual.parameters())


def test_weight_average_is_the_warmed_up_exponential_average():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    avg = WeightAverage([w], decay=0.2)
    ref = w.detach().clone()
    # decay at update t: min(0.2, (1 + t) / (10 + t)) = 0.1, 2/11, then 0.2 (the cap)
    for value, d in zip([3.0, 5.0, -1.0, 7.0], [0.1, 2 / 11, 0.2, 0.2]):
        with torch.no_grad():
            w.fill_(value)
        avg.update()
        ref = d * ref + (1 - d) * torch.full((2,), value)
    assert w.detach().tolist() == [7.0, 7.0]  # update leaves the parameters alone
    avg.copy_to()
    torch.testing.assert_close(w.detach(), ref)


def test_config_rejects_bad_ema():
    with pytest.raises(ValueError, match="ema"):
        BaseModelConfig(ema=1.0)
