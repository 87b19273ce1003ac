"""Shared-prefix group packing: layout, mask and attention against brute force, then the packed
training forward against G separate forwards of the real model (log-probs and gradients)."""
import pytest
import torch

from rlpt_fast.model.packing import FLEX_MIN_TOKENS, Group, dense_mask, pack_groups, packed_attention

DELTA = 3  # a non-zero M-RoPE delta, so positions that forget it are caught


class RopeStub:
    """Stands in for the model where only rope_positions matters: text positions plus DELTA."""

    def rope_positions(self, ids, grid):
        t = ids.numel()
        return (torch.arange(t) * 2).expand(3, t).clone(), DELTA  # prompt positions: 0, 2, 4, ...


def _groups() -> list[Group]:
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 50, (n,), generator=gen)
    return [Group(ids(5), [ids(3), ids(1), ids(4)]), Group(ids(7), [ids(2), ids(6)])]


def _token_roles(groups, share_prompt):
    """Brute force: for each packed row, (sequence, completion or None, offset in its segment)."""
    roles, s = [], 0
    for g in groups:
        members = [list(range(len(g.completions)))] if share_prompt else [[k] for k in range(len(g.completions))]
        for ks in members:
            roles += [(s, None, i) for i in range(g.prompt_ids.numel())]
            for k in ks:
                roles += [(s, k, j) for j in range(g.completions[k].numel() - 1)]
            s += 1
    return roles


@pytest.mark.parametrize("share_prompt", [True, False])
def test_mask_matches_brute_force(share_prompt):
    groups = _groups()
    packed = pack_groups(RopeStub(), groups, share_prompt=share_prompt)
    roles = _token_roles(groups, share_prompt)
    n = len(roles)
    expected = torch.zeros(n, n, dtype=torch.bool)
    for q, (sq, kq, iq) in enumerate(roles):
        for kv, (skv, kkv, ikv) in enumerate(roles):
            if sq != skv:
                continue
            if kkv is None:  # a prompt key: every completion sees all of it, the prompt causally
                expected[q, kv] = kq is not None or ikv <= iq
            else:
                expected[q, kv] = kkv == kq and ikv <= iq
    assert torch.equal(dense_mask(packed), expected)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_layout_positions_and_predictors(share_prompt):
    groups = _groups()
    packed = pack_groups(RopeStub(), groups, share_prompt=share_prompt)
    roles = _token_roles(groups, share_prompt)
    assert packed.input_ids.numel() == len(roles)
    # every target is predicted by the row holding the previous token of [prompt; completion]
    t = 0
    for gi, g in enumerate(groups):
        p = g.prompt_ids.numel()
        full = [torch.cat([g.prompt_ids, c]) for c in g.completions]
        for k, c in enumerate(g.completions):
            for j in range(c.numel()):
                row = int(packed.predict_index[t])
                _, comp, off = roles[row]
                assert packed.target_ids[t] == c[j]
                assert packed.input_ids[row] == full[k][p + j - 1]
                if j == 0:
                    assert comp is None and off == p - 1
                else:
                    assert comp == k and off == j - 1
                    assert packed.positions[:, row].tolist() == [p + j - 1 + DELTA] * 3
                t += 1
    assert t == packed.target_ids.numel() == sum(packed.completion_lengths)


def _reference_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_matches_brute_force(backend):
    packed = pack_groups(RopeStub(), _groups())
    n = packed.input_ids.numel()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    expected = _reference_attention(q, k, v, dense_mask(packed))
    if backend == "flex":  # forward only on CPU (eager flex, fp32): the GPU path's mask_mod and layout
        q, k, v = q.float(), k.float(), v.float()
    out = packed_attention(packed, backend)(0, q, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- against the real model

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from rlpt_fast import load_model
    from rlpt_fast.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("pack"), "qwen2_5_vl", seed=0)
    return load_model(path, dtype=torch.float32).eval()


def _model_groups(model) -> list[Group]:
    """A text prompt and a prompt with two images; completions of lengths 1 to 9."""
    cfg, gen = model.config, torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 300, (n,), generator=gen)
    image = lambda t, h, w: [torch.tensor([cfg.vision_start_token_id]),
                             torch.full((t * h * w // 4,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id])]
    grids = torch.tensor([[1, 4, 6], [1, 6, 4]])
    prompt = torch.cat([text(3), *image(1, 4, 6), text(2), *image(1, 6, 4), text(4)])
    pixels = torch.randn(int(grids.prod(-1).sum()), cfg.vision.patch_dim, generator=gen)
    return [Group(text(9), [text(5), text(1), text(8)]),
            Group(prompt, [text(3), text(9), text(2), text(6)], pixel_values=pixels, image_grid_thw=grids)]


def _packed_logprobs(model, groups, share_prompt=True):
    from rlpt_fast.model.packing import packed_forward

    hidden, packed = packed_forward(model, groups, share_prompt=share_prompt)
    logp = torch.log_softmax(model.compute_logits(hidden), -1)
    return logp.gather(-1, packed.target_ids[:, None])[:, 0]


def _separate_logprobs(model, groups):
    """G separate forwards of [prompt; completion] through model.logits (dense causal)."""
    out = []
    for g in groups:
        p = g.prompt_ids.numel()
        for c in g.completions:
            logits = model.logits(torch.cat([g.prompt_ids, c]), g.pixel_values, g.image_grid_thw)
            out.append(torch.log_softmax(logits[p - 1:-1], -1).gather(-1, c[:, None])[:, 0])
    return torch.cat(out)


def test_packed_logprobs_equal_separate_forwards(model):
    groups = _model_groups(model)
    with torch.no_grad():
        expected = _separate_logprobs(model, groups)
        packed = _packed_logprobs(model, groups)
        unshared = _packed_logprobs(model, groups, share_prompt=False)
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(unshared, expected, rtol=0, atol=1e-5)


def _grads(model, logprobs_fn, groups, weights):
    loss = (logprobs_fn(model, groups) * weights).sum()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _assert_same_grads(model, groups):
    weights = torch.randn(sum(c.numel() for g in groups for c in g.completions),
                          generator=torch.Generator().manual_seed(4))
    expected = _grads(model, _separate_logprobs, groups, weights)
    model.gradient_checkpointing = True  # packed with per-block recomputation: still exact
    try:
        got = _grads(model, _packed_logprobs, groups, weights)
    finally:
        model.gradient_checkpointing = False
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    return got


def test_packed_gradients_of_lora_equal_separate_forwards(model):
    import copy

    from rlpt_fast.model.lora import LoRAConfig, apply_lora, lora_layers
    m = copy.deepcopy(model)
    apply_lora(m, LoRAConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 at init would make every gradient of A vanish
        for _, layer in lora_layers(m):
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=gen))
    got = _assert_same_grads(m, _model_groups(m))
    assert all(".lora_" in n for n in got) and len(got) == 2 * 15


def test_packed_gradients_of_full_weights_equal_separate_forwards(model):
    import copy
    m = copy.deepcopy(model)
    m.model.language_model.requires_grad_(True)
    m.lm_head.requires_grad_(True)
    got = _assert_same_grads(m, _model_groups(m))
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in got


@pytest.mark.gpu
@pytest.mark.parametrize("copies", [3, 8])
def test_flex_on_cuda_matches_sdpa_forward_and_backward(copies):
    """The compiled FlexAttention path (GPU only) against the SDPA path, fp32, with gradients:
    69 packed tokens (under FLEX_MIN_TOKENS: SDPA) and 184 (FlexAttention)."""
    packed = pack_groups(RopeStub(), _groups() * copies).to("cuda")
    n = packed.input_ids.numel()
    assert (n >= FLEX_MIN_TOKENS) == (copies == 8)
    gen = torch.Generator(device="cuda").manual_seed(2)
    qkv = [torch.randn(n, h, 64, device="cuda", generator=gen, requires_grad=True) for h in (8, 2, 2)]
    outs, grads = [], []
    for backend in ("sdpa", "flex"):
        out = packed_attention(packed, backend)(0, *qkv)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out.pow(2).sum(), qkv))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
