"""Packed projections (packed_linear.py): q/k/v and gate/up weights moved into one tensor apiece,
the same Parameters as row views of it, so gradient-free forwards run one GEMM per group. The
values stay exact, the optimizer's in-place updates reach the packed GEMM, anything that replaces a
parameter's data falls back to one GEMM per projection, and gradients are never lost."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rlpt_fast.model import load_model
from rlpt_fast.model.lora import LoRAConfig, LoRALinear, apply_lora, pinned_lora_caches
from rlpt_fast.model.lora_io import save_merged
from rlpt_fast.model import packed_linear
from rlpt_fast.model.packed_linear import PackedProjections, pack_linears, pack_projections, packed_operands, project
from rlpt_fast.rollout import Engine, Request, SamplingParams
from rlpt_fast.testing import write_tiny_checkpoint

GEMMS = {"addmm", "addmm_", "mm", "linear", "matmul", "bmm"}


class GemmCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in GEMMS
        return func(*args, **(kwargs or {}))


def _qkv(bias=True, seed=0):
    torch.manual_seed(seed)
    return [nn.Linear(24, out, bias=bias) for out in (16, 8, 8)]


def _gemms(fn) -> int:
    with GemmCount() as counter:
        fn()
    return counter.count


def test_packing_keeps_values_and_parameters_and_runs_one_gemm():
    mods = _qkv()
    params = [p for m in mods for p in m.parameters()]
    values = [p.detach().clone() for p in params]
    x = torch.randn(5, 24)
    expected = [m(x) for m in mods]
    assert packed_operands(mods) is None
    assert pack_linears(mods) and pack_linears(mods)  # idempotent
    assert [p for m in mods for p in m.parameters()] == params  # the same Parameter objects
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    weight, bias = packed_operands(mods)
    assert weight.shape == (32, 24) and bias.shape == (32,)
    assert weight.untyped_storage().data_ptr() == mods[2].weight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert _gemms(lambda: project(x, mods)) == 1
        got = project(x, mods)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_in_place_updates_reach_the_packed_gemm():
    mods = _qkv(bias=False)
    pack_linears(mods)
    opt = torch.optim.AdamW([p for m in mods for p in m.parameters()], lr=0.1)
    x = torch.randn(3, 24)
    sum(m(x).square().sum() for m in mods).backward()  # grad enabled, weights trainable: own calls
    assert all(m.weight.grad is not None for m in mods)
    opt.step()
    with torch.no_grad():
        got = project(x, mods)
        assert _gemms(lambda: project(x, mods)) == 1
        for g, m in zip(got, mods):
            torch.testing.assert_close(g, x @ m.weight.T, rtol=1e-6, atol=1e-6)


def test_gradients_for_packed_weights_take_the_per_projection_path():
    mods = _qkv()
    pack_linears(mods)
    x = torch.randn(4, 24, requires_grad=True)
    assert _gemms(lambda: project(x, mods)) == 3
    sum(o.sum() for o in project(x, mods)).backward()
    for m in mods:
        torch.testing.assert_close(m.weight.grad, x.detach().sum(0).expand_as(m.weight), rtol=1e-6, atol=1e-6)
        assert torch.equal(m.bias.grad, torch.full_like(m.bias, 4.0))  # 4 rows


def test_frozen_base_with_lora_trains_through_the_packed_gemm():
    """LoRA training: the base is frozen, so one GEMM serves q/k/v; the adapters' gradients are the
    per-projection path's."""
    torch.manual_seed(0)
    plain = [LoRALinear(m, r=2, alpha=4.0, dropout=0.0) for m in _qkv()]
    for m in plain:
        m.base_layer.requires_grad_(False)
        nn.init.normal_(m.lora_B.weight)
    x = torch.randn(6, 24, requires_grad=True)
    sum(o.square().sum() for o in project(x, plain)).backward()
    expected = [(m.lora_A.weight.grad.clone(), m.lora_B.weight.grad.clone()) for m in plain]
    expected_x = x.grad.clone()
    for m in plain:
        m.zero_grad()
    x.grad = None
    assert pack_linears(plain)
    assert _gemms(lambda: project(x, plain)) == 1 + 2 * 3  # base once; each adapter's two
    sum(o.square().sum() for o in project(x, plain)).backward()
    for m, (a, b) in zip(plain, expected):
        torch.testing.assert_close(m.lora_A.weight.grad, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.lora_B.weight.grad, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-5, atol=1e-5)


def test_first_seen_in_inference_mode_then_trained_through():
    """The engine's decode runs under inference_mode; the views it leaves in the layout cache must
    still serve a LoRA training forward (autograd refuses to save inference tensors: these are
    views of normal tensors, which stay normal)."""
    mods = [LoRALinear(m, r=2, alpha=4.0, dropout=0.0) for m in _qkv()]
    for m in mods:
        m.base_layer.requires_grad_(False)
    pack_linears(mods)
    x = torch.randn(3, 24, requires_grad=True)
    with torch.inference_mode():
        project(x.detach(), mods)
    sum(o.square().sum() for o in project(x, mods)).backward()
    assert x.grad is not None and all(m.lora_A.weight.grad is not None for m in mods)


def test_pinned_lora_adds_into_its_slice_in_place():
    model = nn.Module()
    model.q, model.k, model.v = (LoRALinear(m, r=2, alpha=4.0, dropout=0.0) for m in _qkv())
    mods = [model.q, model.k, model.v]
    for m in mods:
        nn.init.normal_(m.lora_B.weight)
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = [m(x) for m in mods]
    pack_linears(mods)
    with pinned_lora_caches(model), torch.no_grad():
        got = project(x, mods)
    assert got[0].untyped_storage().data_ptr() == got[2].untyped_storage().data_ptr()  # slices of one output
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


RANKS = {"q": 2, "k": 3, "v": 4}  # unequal: the stacked A and the block diagonal need offsets


class QKV(PackedProjections):
    """A packed group as the decoder declares one."""
    PACKED_PROJECTIONS = (("q", "k", "v"),)

    def __init__(self, adapted=("q", "k", "v")):
        super().__init__()
        for name, m in zip("qkv", _qkv()):
            if name in adapted:
                m = LoRALinear(m, r=RANKS[name], alpha=4.0, dropout=0.1)
                nn.init.normal_(m.lora_B.weight)
            setattr(self, name, m)
        self.eval()

    @property
    def members(self):
        return [self.q, self.k, self.v]


def test_pinned_group_runs_all_adapters_as_one_low_rank_pair():
    """q/k/v all adapted and pinned: one GEMM over the weights and the stacked A (rows reserved
    after the weights), then one addmm of the block-diagonal B."""
    model = QKV()
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = [m(x) for m in model.members]  # unpinned: each adapter on its own
    assert pack_projections(model) == 1
    with pinned_lora_caches(model), torch.no_grad():
        assert _gemms(lambda: project(x, model.members)) == 2
        got = project(x, model.members)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    group = model.q.inference_cache.group
    assert group.a.shape == (9, 24) and group.b.shape == (32, 9)
    weight, bias = group.fused  # the parameters' rows, then A's, in one allocation
    assert weight.shape == (41, 24) and weight.data_ptr() == model.q.weight.data_ptr()
    assert group.a.data_ptr() == weight[32:].data_ptr() and bias.shape == (41,) and bias[32:].abs().sum() == 0
    torch.testing.assert_close(weight[:32], torch.cat([m.weight for m in model.members]), rtol=0, atol=0)
    # block diagonal: q's rows (16) use columns 0-1, k's (8) columns 2-4, v's (8) columns 5-8
    assert group.b[:16, 2:].abs().sum() == 0 and group.b[16:24, :2].abs().sum() == 0
    assert group.b[16:24, 5:].abs().sum() == 0 and group.b[24:, :5].abs().sum() == 0
    assert group.b[24:, 5:].abs().sum() > 0


def test_group_packed_before_its_adapters_gets_rows_when_packed_again():
    """Packed plain, then wrapped: the stacked A has no rows beside the weights (3 GEMMs: base,
    A, B); packing again moves the weights to make them (2 GEMMs). Values never change."""
    mods = _qkv()
    pack_linears(mods)
    model = QKV.__new__(QKV)
    PackedProjections.__init__(model)
    for name, m, in zip("qkv", mods):
        lora = LoRALinear(m, r=RANKS[name], alpha=4.0, dropout=0.0)
        nn.init.normal_(lora.lora_B.weight)
        setattr(model, name, lora)
    x = torch.randn(4, 24)
    with torch.no_grad():
        expected = [m(x) for m in model.members]
    for gemms in (3, 2):
        with pinned_lora_caches(model), torch.no_grad():
            assert _gemms(lambda: project(x, model.members)) == gemms
            for g, e in zip(project(x, model.members), expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert pack_projections(model) == 1


def test_a_lone_adapted_projection_takes_its_a_into_the_base_gemm():
    """o_proj / down_proj: a group of one, packed only for its adapter's rows (2 GEMMs, not 3);
    a lone projection without an adapter is not moved."""
    class Out(PackedProjections):
        PACKED_PROJECTIONS = (("o",), ("plain",))

        def __init__(self):
            super().__init__()
            self.o = LoRALinear(nn.Linear(24, 16, bias=False), r=3, alpha=6.0, dropout=0.0)
            nn.init.normal_(self.o.lora_B.weight)
            self.plain = nn.Linear(24, 16)

    model = Out()
    plain_weight = model.plain.weight.data_ptr()
    x = torch.randn(6, 24)
    with torch.no_grad():
        expected = model.o(x)
    assert pack_projections(model) == 1 and model.plain.weight.data_ptr() == plain_weight
    with pinned_lora_caches(model), torch.no_grad():
        assert _gemms(lambda: project(x, (model.o,))) == 2
        torch.testing.assert_close(project(x, (model.o,))[0], expected, rtol=1e-5, atol=1e-5)
        assert _gemms(lambda: project(x, (model.plain,))) == 1
    model.o.base_layer.to(torch.float64).to(torch.float32)  # new storage: no rows reserved beside it
    with pinned_lora_caches(model), torch.no_grad():
        assert model.o.inference_cache.group is None  # no rows: no group cache either
        assert _gemms(lambda: project(x, (model.o,))) == 3
        torch.testing.assert_close(project(x, (model.o,))[0], expected, rtol=1e-5, atol=1e-5)


def test_group_cache_refreshes_in_place_with_the_adapters():
    model = QKV()
    pack_projections(model)
    x = torch.randn(3, 24)
    with pinned_lora_caches(model):
        pass
    group = model.q.inference_cache.group
    pointers = (group.a.data_ptr(), group.b.data_ptr())
    with torch.no_grad():
        model.k.lora_B.weight.mul_(-2.0)  # as an optimizer step would, in place
        model.v.lora_A.weight.add_(0.5)
        expected = [m(x) for m in model.members]
    with pinned_lora_caches(model), torch.no_grad():
        got = project(x, model.members)
    assert (group.a.data_ptr(), group.b.data_ptr()) == pointers  # CUDA graphs captured over it see the new values
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_partly_adapted_or_disabled_groups_take_their_own_paths():
    from rlpt_fast.model.lora import adapter_disabled

    model = QKV(adapted=("q", "v"))
    pack_projections(model)
    x = torch.randn(4, 24)
    with torch.no_grad():
        expected = [m(x) for m in model.members]
    with pinned_lora_caches(model), torch.no_grad():
        assert model.q.inference_cache.group is None
        assert _gemms(lambda: project(x, model.members)) == 1 + 2 * 2  # each adapter on its slice
        for g, e in zip(project(x, model.members), expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    full = QKV()
    pack_projections(full)
    with pinned_lora_caches(full), adapter_disabled(full), torch.no_grad():
        assert _gemms(lambda: project(x, full.members)) == 1
        got = project(x, full.members)
    torch.testing.assert_close(got[1], full.k.base_layer(x), rtol=1e-6, atol=1e-6)


def test_replaced_data_falls_back_and_packs_again():
    mods = _qkv()
    pack_linears(mods)
    for m in mods:
        m.to(torch.float64)  # new storage per parameter
    assert packed_operands(mods) is None
    x = torch.randn(2, 24, dtype=torch.float64)
    with torch.no_grad():
        assert _gemms(lambda: project(x, mods)) == 3
        assert pack_linears(mods)
        assert _gemms(lambda: project(x, mods)) == 1


def test_packing_inside_inference_mode_leaves_trainable_weights():
    """An engine may be built inside torch.inference_mode(): the packed weights must stay normal
    tensors, or every later training backward through them fails."""
    mods = [LoRALinear(m, r=2, alpha=4.0, dropout=0.0) for m in _qkv()]
    with torch.inference_mode():
        assert pack_linears(mods)
    assert not any(m.base_layer.weight.is_inference() for m in mods)
    x = torch.randn(3, 24, requires_grad=True)
    sum(m(x).sum() for m in mods).backward()
    assert x.grad is not None


def test_moving_a_module_drops_its_cached_views():
    """The views cached for a group hold its packed storage: .to() (Module._apply) must let it go."""
    model = QKV()
    pack_projections(model)
    with torch.no_grad():
        project(torch.randn(2, 24), model.members)
    assert model.q.base_layer in packed_linear._checked
    model.to(torch.float64)
    assert model.q.base_layer not in packed_linear._checked
    assert packed_operands(model.members) is None  # new storage per parameter: one call per projection


@pytest.mark.parametrize("where", ["wrapper", "base", "global"])
def test_any_hook_keeps_the_calls(where):
    """A forward hook on the LoRA wrapper, on its base Linear or on every module must see its call."""
    model = QKV()
    pack_projections(model)
    seen = []
    hook = lambda module, args, out: seen.append(module)  # noqa: E731
    if where == "wrapper":
        handle = model.k.register_forward_hook(hook)
    elif where == "base":
        handle = model.k.base_layer.register_forward_hook(hook)
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            project(torch.randn(2, 24), model.members)
    finally:
        handle.remove()
    assert model.k.base_layer in seen or model.k in seen
    with torch.no_grad():
        assert _gemms(lambda: project(torch.randn(2, 24), model.members)) == 1 + 2 * 3  # hooks gone: packed


def test_not_packable_groups_are_left_alone():
    mixed = [nn.Linear(24, 8), nn.Linear(24, 8, bias=False)]
    assert not pack_linears(mixed)
    assert packed_operands(mixed) is None
    assert not pack_linears([nn.Linear(24, 8), nn.Linear(12, 8)])  # different inputs
    mods = _qkv()
    pack_linears(mods)
    mods[1].register_forward_hook(lambda *args: None)
    with torch.no_grad():
        assert _gemms(lambda: project(torch.randn(2, 24), mods)) == 3  # a hook must see its call


def test_packed_model_logits_lora_and_merged_export(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "base", "qwen2_5_vl", seed=0)
    model = load_model(path, dtype=torch.float32).eval()
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "up_proj")))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.logits(ids)
    layers = model.config.num_hidden_layers
    assert pack_projections(model) == 2 * layers
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids), before, rtol=1e-5, atol=1e-5)
    out = save_merged(model, path, tmp_path / "merged")  # safetensors takes the disjoint views
    merged = load_model(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.logits(ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pack", [True, False])
def test_engine_packs_and_samples_the_same(tmp_path, pack):
    path = write_tiny_checkpoint(tmp_path, "qwen2_5_vl", seed=2)
    model = load_model(path, dtype=torch.float32)
    reference = load_model(path, dtype=torch.float32)
    engine = Engine(model, num_blocks=64, pack_projections=pack)
    attn = model.model.language_model.layers[0].self_attn
    assert (packed_operands([attn.q_proj, attn.k_proj, attn.v_proj]) is not None) == pack
    request = [Request(torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3)).tolist())]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5)
    got = engine.generate(request, params)[0]
    want = Engine(reference, num_blocks=64, pack_projections=False).generate(request, params)[0]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)


def test_recapture_packs_again_after_parameters_were_replaced(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "qwen2_5_vl", seed=4)
    model = load_model(path, dtype=torch.float32)
    engine = Engine(model, num_blocks=64)
    mlp = model.model.language_model.layers[0].mlp
    assert packed_operands([mlp.gate_proj, mlp.up_proj]) is not None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new tensors: the engine's packing is gone
    assert packed_operands([mlp.gate_proj, mlp.up_proj]) is None
    engine.recapture()
    assert packed_operands([mlp.gate_proj, mlp.up_proj]) is not None


def test_a_no_op_move_or_the_cache_switched_off_keeps_the_reserved_rows(monkeypatch):
    """model.to() to where it already is, and packing again with the inference cache off, move
    nothing: the rows CUDA graphs captured over stay the ones each refresh writes A into."""
    from rlpt_fast.model import lora_inference

    model = QKV()
    pack_projections(model)
    with pinned_lora_caches(model):
        rows = model.q.inference_cache.group.a.data_ptr()
    weight = model.q.weight.data_ptr()
    model.to("cpu")
    model.float()
    monkeypatch.setattr(lora_inference, "ENABLED", False)
    assert pack_projections(model) == 1
    monkeypatch.setattr(lora_inference, "ENABLED", True)
    assert model.q.weight.data_ptr() == weight
    x = torch.randn(3, 24)
    with torch.no_grad():
        model.k.lora_A.weight.add_(1.0)
        expected = [m(x) for m in model.members]
    with pinned_lora_caches(model), torch.no_grad():
        assert model.q.inference_cache.group.a.data_ptr() == rows
        for g, e in zip(project(x, model.members), expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_a_refresh_between_forward_and_backward_leaves_the_backward_intact():
    """Writing A into the reserved rows is not a change of the base weights autograd saved."""
    model = QKV()
    model.train()
    pack_projections(model)
    with pinned_lora_caches(model):
        pass
    x = torch.randn(4, 24, requires_grad=True)
    loss = sum(o.square().sum() for o in project(x, model.members))
    with pinned_lora_caches(model):  # a rollout between the forward and its backward
        pass
    loss.backward()
    assert x.grad is not None and model.v.lora_B.weight.grad is not None


def test_autocast_and_unusual_linears_take_the_unfused_paths():
    model = QKV()
    model.eval()
    pack_projections(model)
    x = torch.randn(3, 24)
    with torch.no_grad():
        expected = [m(x) for m in model.members]
    with pinned_lora_caches(model), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = project(x, model.members)
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e, rtol=3e-2, atol=3e-2)

    class Scaled(nn.Linear):  # a Linear subclass (quantized, instrumented): not packable
        def forward(self, x):
            return super().forward(x) * 2.0

    mods = [Scaled(24, 8), nn.Linear(24, 8)]
    with torch.no_grad():
        out = project(x, mods)
        torch.testing.assert_close(out[0], mods[0](x))


def test_an_apply_that_keeps_addresses_but_not_the_dtype_drops_the_cached_views():
    class Pair(PackedProjections):
        PACKED_PROJECTIONS = (("a", "b"),)

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4).half(), nn.Linear(8, 6).half()

    model = Pair()
    assert pack_projections(model) == 1
    x = torch.randn(3, 8)
    with torch.no_grad():
        project(x.half(), [model.a, model.b])  # caches fp16 views
        model._apply(lambda t: t.view(torch.bfloat16))  # same bytes, same addresses, new dtype
        got = project(x.bfloat16(), [model.a, model.b])
        torch.testing.assert_close(got[1], model.b(x.bfloat16()))
