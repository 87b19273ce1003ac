"""LoRA's rollout path (lora_inference.py): inside a pinned block, the autograd path's values in
three kernels over a cache that is recomputed in place when the block starts (so it is never stale,
whatever wrote the adapters: plain, foreach or fused AdamW, `.data`), and that no file ever sees."""
import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rlpt_fast.model import lora_inference
from rlpt_fast.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_disabled,
    apply_lora,
    lora_layers,
    pinned_lora_caches,
    refresh_lora_caches,
)

ALIASES = {"linear": "addmm", "matmul": "mm"}  # inference mode shows these undecomposed
VIEWS = {"t", "view", "_unsafe_view", "reshape", "expand", "transpose", "detach", "alias"}


class OpLog(TorchDispatchMode):
    """The aten ops that do work (views left out), in call order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.ops.append(ALIASES.get(name, name))
        return func(*args, **(kwargs or {}))


def _layer(dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(16, 12).to(dtype), r=4, alpha=6.0, dropout=dropout,
                       dtype=torch.float32)  # scaling 1.5; fp32 adapters as LoRAConfig makes them
    nn.init.normal_(layer.lora_B.weight)
    return layer.eval()


def _expected(layer, x):
    """fp64 reference of base(x) + scaling * x A^T B^T from the layer's own parameters."""
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    return x.double() @ w.T + b + layer.scaling * x.double() @ layer.lora_A.weight.double().T @ layer.lora_B.weight.double().T


def _close(got, layer, x):
    torch.testing.assert_close(got.double(), _expected(layer, x), atol=1e-5, rtol=1e-5)


def test_fp32_pinned_path_equals_autograd_path_in_three_kernels():
    layer = _layer()
    x = torch.randn(2, 5, 16)
    autograd = layer(x)  # grad enabled: the adapters require grad
    assert autograd.requires_grad
    with torch.no_grad(), OpLog() as log:
        outside = layer(x)
    torch.testing.assert_close(outside, autograd.detach(), atol=1e-6, rtol=1e-6)
    assert log.ops == ["addmm", "mm", "mul", "mm", "add"]  # outside a pinned block: autograd path (fp32: no casts)
    with pinned_lora_caches(layer):
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx(), OpLog() as log:
                got = layer(x)
            torch.testing.assert_close(got, autograd.detach(), atol=1e-6, rtol=1e-6)
            assert log.ops == ["addmm", "mm", "addmm_"]  # base with bias; x @ A_c^T; += (.) @ B_s^T
        assert layer(x).requires_grad  # grad enabled inside the block: still the autograd path
    _close(got, layer, x)


def test_bf16_pinned_path_within_bf16_rounding_of_the_autograd_path():
    layer = _layer(torch.bfloat16)  # fp32 adapters on a bf16 base, as the trainer runs
    x = torch.randn(64, 16).bfloat16()
    with OpLog() as log:
        autograd = layer(x).detach()
    assert log.ops.count("_to_copy") == 2 and len(log.ops) == 7  # A and B cast on every call
    with torch.no_grad(), pinned_lora_caches(layer), OpLog() as log:
        got = layer(x)
    assert log.ops == ["addmm", "mm", "addmm_"]  # no cast: the cache is bf16 already
    assert got.dtype == layer.inference_cache.b.dtype == torch.bfloat16
    ref = _expected(layer, x)
    err_cached, err_autograd = (got.double() - ref).abs().max(), (autograd.double() - ref).abs().max()
    assert err_cached <= 2 * err_autograd + 1e-3, (err_cached, err_autograd)  # flash-attention's rule
    torch.testing.assert_close(got, autograd, atol=2 * ref.abs().max().item() * 2**-8, rtol=2**-7)


@pytest.mark.parametrize("kind", ["fused", "foreach", "for-loop"])
def test_each_pinned_block_sees_the_last_adamw_step_in_the_same_storage(kind):
    """Fused AdamW does not bump the parameters' _version: only the unconditional refresh is exact."""
    layer = _layer()
    x = torch.randn(7, 16)
    with torch.no_grad(), pinned_lora_caches(layer):
        before = layer(x)
    ptrs = (layer.inference_cache.a.data_ptr(), layer.inference_cache.b.data_ptr())
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[kind]
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, **flags)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad(), pinned_lora_caches(layer):
            got = layer(x)
        _close(got, layer, x)
        assert not torch.allclose(got, before, atol=1e-3)
        assert (layer.inference_cache.a.data_ptr(), layer.inference_cache.b.data_ptr()) == ptrs
        before = got


def test_writes_that_bypass_version_counters_are_seen():
    layer = _layer()
    x = torch.randn(3, 16)
    with torch.no_grad(), pinned_lora_caches(layer):
        layer(x)
    layer.lora_A.weight.data.mul_(-1.0)             # `.data` has its own version counter
    layer.lora_B.weight.data = torch.randn(12, 4)   # a new tensor under the same Parameter
    with torch.no_grad():
        _close(layer(x), layer, x)  # outside a block the cache is never read
        with pinned_lora_caches(layer):
            _close(layer(x), layer, x)


def test_a_cache_made_in_inference_mode_refreshes_outside_it():
    layer = _layer()
    x = torch.randn(3, 16)
    with torch.inference_mode(), pinned_lora_caches(layer):
        layer(x)
    assert not layer.inference_cache.a.is_inference()  # else the in-place refresh below would fail
    with torch.no_grad():
        layer.lora_A.weight.mul_(-1.0)
        with pinned_lora_caches(layer):
            _close(layer(x), layer, x)


def test_a_refresh_in_grad_mode_records_nothing_for_autograd():
    """The trainer refreshes with grad mode on: the cache must not hold a graph back to A and B."""
    layer = _layer()
    assert torch.is_grad_enabled()
    for _ in range(2):  # made, then refreshed in place
        with pinned_lora_caches(layer):
            pass
        cache = layer.inference_cache
        assert not cache.a.requires_grad and cache.a.grad_fn is None
        assert not cache.b.requires_grad and cache.b.grad_fn is None


def test_refresh_is_unconditional_and_pinning_ends_with_the_block():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 12))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert refresh_lora_caches(model) == 2 and refresh_lora_caches(model) == 2
    caches = [m.inference_cache for _, m in lora_layers(model)]
    with pinned_lora_caches(model):
        assert all(c.pinned for c in caches)
    assert not any(c.pinned for c in caches)


def test_disabled_adapter_is_the_base_matmul_alone():
    layer = _layer()
    x = torch.randn(4, 16)
    for block in (pinned_lora_caches, lambda m: torch.no_grad()):
        with torch.no_grad(), block(layer), adapter_disabled(layer), OpLog() as log:
            got = layer(x)
        assert torch.equal(got, layer.base_layer(x)) and log.ops == ["addmm"]


def test_active_dropout_takes_the_autograd_path():
    layer = _layer(dropout=0.5).train()
    x = torch.randn(6, 16)
    with torch.no_grad(), pinned_lora_caches(layer):
        torch.manual_seed(3)
        got = layer(x)
        torch.manual_seed(3)
        keep = layer.lora_dropout(x)
    want = layer.base_layer(x) + layer.scaling * keep @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(got, want.detach())


def test_the_switch_forces_the_per_call_cast_path(monkeypatch):
    layer = _layer()
    x = torch.randn(4, 16)
    monkeypatch.setattr(lora_inference, "ENABLED", False)
    with torch.no_grad(), pinned_lora_caches(layer), OpLog() as log:
        got = layer(x)
    assert layer.inference_cache.a is None and len(log.ops) == 5
    _close(got, layer, x)


def test_caches_are_in_no_state_dict_adapter_file_or_checkpoint(tmp_path):
    from rlpt_fast.model.lora_io import save_adapter
    from rlpt_fast.train.checkpoint import TrainerState, save_checkpoint

    model = nn.Module()
    model.lm_head = nn.Linear(16, 12)
    model.up_proj = nn.Linear(16, 16)
    apply_lora(model, LoRAConfig(r=4, dropout=0.0))
    keys = set(model.state_dict())
    refresh_lora_caches(model)
    assert all(m.inference_cache.a is not None for _, m in lora_layers(model))
    assert set(model.state_dict()) == keys and not list(model.buffers())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.lm_head(torch.randn(2, 16)).sum().backward()
    opt.step()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ckpt = save_checkpoint(tmp_path / "out", model=model, optimizer=opt, param_names=names,
                           state=TrainerState(step=1), stream_state={}, config={}, base_model_path="none",
                           lora=True, merged=False)
    files = [save_adapter(model, tmp_path / "adapter") / "adapter_model.safetensors", *ckpt.rglob("*.safetensors")]
    assert len(files) == 3
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                assert "cache" not in key and "inference" not in key, (f, key)
                assert not key.startswith("optim/") or ".lora_" in key, (f, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wrapped_stack_in_a_pinned_block_matches_autograd(dtype):
    """Several layers, 3-D activations, dropout configured but off in eval."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16, bias=False)).to(dtype)
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.1))
    for _, m in lora_layers(model):
        nn.init.normal_(m.lora_B.weight, std=0.2)
    model.eval()
    x = torch.randn(3, 4, 16).to(dtype)
    want = model(x).detach()
    with torch.no_grad(), pinned_lora_caches(model):
        got = model(x)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
