"""Entry points beyond parity: embed, the image cache, attention helpers, checkpointing, costs."""
import pytest
import torch

from rlpt_fast.model import causal_attention, load_model
from rlpt_fast.model.attention import sdpa, segment_attention


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


def _pixels(model, grids, seed):
    g = torch.Generator().manual_seed(seed)
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, model.config.vision.patch_dim, generator=g), torch.tensor(grids)


def test_embed_replaces_image_rows_in_order(model):
    img = model.config.image_token_id
    ids = torch.tensor([1, img, img, 2, img])
    fake = torch.arange(3 * model.config.hidden_size, dtype=torch.float32).view(3, -1)
    out = model.embed(ids, fake)
    torch.testing.assert_close(out[[1, 2, 4]], fake)
    torch.testing.assert_close(out[[0, 3]], model.model.language_model.embed_tokens.weight[[1, 2]])
    with pytest.raises(ValueError, match="3 image tokens but image_embeds has 2 rows"):
        model.embed(ids, fake[:2])


def test_image_cache_encodes_each_distinct_image_once(model, monkeypatch):
    model.clear_image_cache()
    px_a, grid_a = _pixels(model, [[1, 4, 6]], seed=1)
    px_b, grid_b = _pixels(model, [[1, 8, 4]], seed=2)
    with torch.no_grad():
        direct = model.model.visual(torch.cat([px_a, px_b]), torch.cat([grid_a, grid_b]))
    calls = []
    real = model.model.visual.forward
    monkeypatch.setattr(model.model.visual, "forward", lambda p, g: calls.append(g.tolist()) or real(p, g))
    first = model.encode_images(torch.cat([px_a, px_b, px_a]), torch.cat([grid_a, grid_b, grid_a]))
    again = model.encode_images(torch.cat([px_b, px_a]), torch.cat([grid_b, grid_a]))
    assert calls == [[[1, 4, 6], [1, 8, 4]]]  # one tower call, the repeated image not re-encoded
    assert not first.requires_grad
    torch.testing.assert_close(first, torch.cat([direct, direct[:6]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(again, torch.cat([direct[6:], direct[:6]]), atol=0, rtol=0)
    model.clear_image_cache()
    model.encode_images(px_a, grid_a)
    assert len(calls) == 2


def test_a_pixel_tensor_is_hashed_once_until_it_changes(model, monkeypatch):
    """The trainer and the engine encode the same prompt tensors in a step: the second call reuses
    the first's keys. A tensor modified in place, or another tensor, is hashed again, and an
    inference tensor (no version counter) is always hashed."""
    import rlpt_fast.model.model as model_module

    hashed = []
    real = model_module._image_key
    monkeypatch.setattr(model_module, "_image_key", lambda p, g: hashed.append(g) or real(p, g))
    model.clear_image_cache()
    px, grid = _pixels(model, [[1, 4, 6], [1, 8, 4]], seed=3)
    first = model.encode_images(px, grid)
    assert len(hashed) == 2
    torch.testing.assert_close(model.encode_images(px, grid), first, atol=0, rtol=0)
    assert len(hashed) == 2  # same object, same version: no hashing
    model.encode_images(px.clone(), grid)
    assert len(hashed) == 4  # another object: hashed (and found in the embedding cache)
    px[:24].add_(1.0)  # the first image changed in place
    changed = model.encode_images(px, grid)
    assert len(hashed) == 6
    assert not torch.equal(changed[:6], first[:6]) and torch.equal(changed[6:], first[6:])
    with torch.inference_mode():
        frozen = px.clone()
    model.encode_images(frozen, grid)
    model.encode_images(frozen, grid)
    assert len(hashed) == 10


@pytest.mark.gpu
def test_host_pixels_are_hashed_on_the_host_and_only_unseen_images_moved(tiny_ckpt, monkeypatch):
    """A model on the GPU takes host pixels (what the engine and the trainer pass): the cache key
    is computed without a device round trip, the tower sees device pixels of the new images only."""
    gpu = load_model(tiny_ckpt, dtype=torch.float32, device="cuda")
    px_a, grid_a = _pixels(gpu, [[1, 4, 6]], seed=1)
    px_b, grid_b = _pixels(gpu, [[1, 8, 4]], seed=2)
    with torch.no_grad():
        want = gpu.model.visual(torch.cat([px_a, px_b]).cuda(), torch.cat([grid_a, grid_b]))
    gpu.encode_images(px_a, grid_a)
    seen = []
    real = gpu.model.visual.forward
    monkeypatch.setattr(gpu.model.visual, "forward", lambda p, g: seen.append((p.device.type, p.shape[0])) or real(p, g))
    got = gpu.encode_images(torch.cat([px_a, px_b]), torch.cat([grid_a, grid_b]))
    assert seen == [("cuda", 32)] and got.device.type == "cuda"
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)  # batch composition may round differently


def test_causal_attention_keeps_sequences_apart():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, 8, generator=g) for h in (4, 2, 2))
    out = causal_attention(torch.tensor([0, 4, 4, 9]))(0, q, k, v)
    for a, b in [(0, 4), (4, 9)]:
        kk, vv = (t[a:b].repeat_interleave(2, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[a:b], kk) / 8**0.5
        scores = scores.masked_fill(torch.ones(b - a, b - a).triu(1).bool(), float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)
        torch.testing.assert_close(out[a:b], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bounds", [[0, 4, 8, 12], [0, 3, 10, 11, 16]])
def test_segment_attention_equals_one_call_per_segment(bounds):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(bounds[-1], 2, 8, generator=g) for _ in range(3))
    out = segment_attention(q, k, v, torch.tensor(bounds))
    expected = torch.cat([sdpa(q[a:b], k[a:b], v[a:b], causal=False) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ckpt):
    model = load_model(tiny_ckpt)
    ids = torch.tensor([3, 17, 42, 99, 7, 250, 12])
    pos, _ = model.rope_positions(ids)
    attn = causal_attention(torch.tensor([0, 3, 7]))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model.compute_logits(model.forward_hidden(model.embed(ids), pos, attn)).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "model.language_model.layers.0.self_attn.q_proj.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_costs_match_a_hand_count(model):
    # tiny config: hidden 64, inner 128, 2 layers, 4 heads of 16, 2 kv heads, vocab 448, fp32
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (64, 128, 2, 4, 2, 16, 448)
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q k v o, gate up down
    matmul = 2 * per_layer + 64 * 448  # + lm_head
    assert model.flops_per_token(context=100, training=False) == 2 * matmul + 4 * 2 * 4 * 16 * 100
    assert model.flops_per_token(context=100, training=True) == 3 * (2 * matmul + 4 * 2 * 4 * 16 * 100)
    assert model.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 4
    biases_norms = 2 * (64 + 32 + 32 + 64 + 64) + 64  # q/k/v biases, two norms per layer, final norm
    assert model.weight_bytes() == 4 * (matmul + 448 * 64 + biases_norms)  # + embedding
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert model.vision_weight_bytes() == 4 * vision > 0


def test_unfrozen_tower_is_differentiable_and_uncached(tiny_ckpt):
    model = load_model(tiny_ckpt)
    model.model.visual.requires_grad_(True)
    px, grid = _pixels(model, [[1, 4, 4]], seed=3)
    out = model.encode_images(px, grid)
    out.sum().backward()
    assert model.model.visual.merger.mlp[2].weight.grad is not None and not model._image_cache


@pytest.mark.parametrize("change, message", [
    (lambda px, grid: (px, None), "pixel_values without image_grid_thw"),
    (lambda px, grid: (px, grid[0]), r"image_grid_thw must be \(I, 3\)"),
    (lambda px, grid: (px[:, :-1], grid), r"pixel_values must be \(P, 1176\)"),
    (lambda px, grid: (px[:-4], grid), "pixel_values has 20 rows, image_grid_thw needs 24"),
])
def test_encode_images_names_what_does_not_fit(model, change, message):
    """Checked at the entry (the tower would fail in a matmul or reshape, or the cache mis-split)."""
    px, grid = change(*_pixels(model, [[1, 4, 6]], seed=3))
    with pytest.raises(ValueError, match=message):
        model.encode_images(px, grid)
