"""The decoder's fused inference path (rlpt_kernels' one-launch norm/rotary/SwiGLU kernels, taken
when no gradient is needed and the kernels' backend is Triton) against the eager path: the same
logits (fp32, the kernels in Triton's interpreter on CPU), the same greedy tokens from the engine,
and training untouched (autograd never sees the fused kernels)."""
import pytest
import torch

import rlpt_kernels
from rlpt_fast.model import load_model
from rlpt_fast.model.packed_linear import pack_projections
from rlpt_fast.rollout import Engine, Request, SamplingParams
from rlpt_fast.testing import write_tiny_checkpoint

FUSED_OPS = ("rms_norm", "add_rms_norm", "silu_mul", "rotary")


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of each fused op by the decoder (it calls them as rlpt_kernels.<op>)."""
    counts = dict.fromkeys(FUSED_OPS, 0)

    def counting(name, fn):
        def counted(*args):
            counts[name] += 1
            return fn(*args)
        return counted

    for name in FUSED_OPS:
        monkeypatch.setattr(rlpt_kernels, name, counting(name, getattr(rlpt_kernels, name)))
    return counts


def _logits(model, ids, pixels, grid, backend, monkeypatch):
    monkeypatch.setenv("RLPT_KERNELS_BACKEND", backend)
    with torch.no_grad():
        return model.logits(ids, pixels, grid)


def _image_prompt(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 4, 6]])
    n_img = 4 * 6 // cfg.vision.spatial_merge_size ** 2
    ids = torch.cat([torch.randint(0, 300, (5,), generator=g), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.randint(0, 300, (7,), generator=g)])
    return ids, torch.randn(24, cfg.vision.patch_dim, generator=g), grid


def test_fused_logits_match_eager_with_an_image(tiny_ckpt, launches, monkeypatch):
    model = load_model(tiny_ckpt, dtype=torch.float32).eval()
    ids, pixels, grid = _image_prompt(model.config)
    eager = _logits(model, ids, pixels, grid, "torch", monkeypatch)
    assert sum(launches.values()) == 0
    fused = _logits(model, ids, pixels, grid, "triton", monkeypatch)
    layers = model.config.num_hidden_layers
    # layer 0's input norm alone, then every other norm with the residual add before it
    assert launches == {"rms_norm": 1, "add_rms_norm": 2 * layers, "silu_mul": layers, "rotary": layers}
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert pack_projections(model) == 2 * layers  # the kernels then read column slices of q/k/v, gate/up
    torch.testing.assert_close(_logits(model, ids, pixels, grid, "triton", monkeypatch), eager, rtol=1e-5, atol=1e-5)


def test_fused_logits_match_eager_at_odd_shapes(tmp_path, monkeypatch):
    """hidden 36 (not a power of two), 3 query heads over 1 KV head of 12, intermediate 100."""
    path = write_tiny_checkpoint(tmp_path, "qwen2_5_vl", seed=1, hidden_size=36, num_attention_heads=3,
                                 num_key_value_heads=1, intermediate_size=100, num_hidden_layers=3)
    model = load_model(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(2))
    eager = _logits(model, ids, None, None, "torch", monkeypatch)
    fused = _logits(model, ids, None, None, "triton", monkeypatch)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_training_forward_stays_eager_under_the_triton_backend(tiny_ckpt, launches, monkeypatch):
    model = load_model(tiny_ckpt, dtype=torch.float32)
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("RLPT_KERNELS_BACKEND", "triton")
    model.logits(ids).float().pow(2).mean().backward()
    assert sum(launches.values()) == 0
    grad = model.model.language_model.layers[0].mlp.gate_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.requires_grad_(False)  # nothing needs a gradient: fused even with grad mode on
    assert model.model.language_model.use_fused_ops(model.embed(ids))


def test_engine_greedy_tokens_equal_with_fused_decoder(tiny_ckpt, launches, monkeypatch):
    """Eager decoder and torch attention; fused decoder and torch attention (rlpt_kernels.rotary);
    fused decoder and Triton attention (rotary in the K/V store's launch, as on a GPU)."""
    from rlpt_fast.rollout import kv_store
    model = load_model(tiny_ckpt, dtype=torch.float32).eval()
    prompts = [_image_prompt(model.config, seed=4),
               (torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(5)), None, None)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    stored = []
    fused_store = kv_store.rotary_store_kv
    monkeypatch.setattr(kv_store, "rotary_store_kv", lambda *a: stored.append(1) or fused_store(*a))
    outs = {}
    for kernels, attention in (("torch", "torch"), ("triton", "torch"), ("triton", "triton")):
        monkeypatch.setenv("RLPT_KERNELS_BACKEND", kernels)
        launches["rotary"], stored[:] = 0, []
        engine = Engine(model, num_blocks=32, block_size=4, attention_backend=attention)
        got = engine.generate([Request(*p) for p in prompts], params)
        outs[kernels, attention] = [o[0].token_ids for o in got], torch.tensor([o[0].logprobs for o in got])
        # prefill and decode steps: rotary fused with the K/V store where the attention is Triton's
        assert (launches["rotary"] > 0) == ((kernels, attention) == ("triton", "torch"))
        assert bool(stored) == (attention == "triton")
    want_tokens, want_logprobs = outs["torch", "torch"]
    for tokens, logprobs in outs.values():
        assert tokens == want_tokens
        torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-4, atol=1e-4)


def _rel(a, exact):
    return ((a - exact).norm() / exact.norm()).item()


# ---- on the device: the fused path is the default there ----------------------------------------
@pytest.mark.gpu
def test_bf16_fused_logits_as_close_to_fp32_as_eager_bf16(tiny_ckpt, monkeypatch):
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(6))
    exact = load_model(tiny_ckpt, dtype=torch.float32, device="cuda").eval()
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda").eval()
    want = _logits(exact, ids, None, None, "torch", monkeypatch).double()
    eager = _logits(model, ids, None, None, "torch", monkeypatch).double()
    fused = _logits(model, ids, None, None, "auto", monkeypatch).double()
    with torch.no_grad():  # as in _logits: the fused path is the gradient-free one
        assert model.model.language_model.use_fused_ops(model.embed(ids.cuda()))
    assert _rel(fused, want) <= 2 * _rel(eager, want)


@pytest.mark.gpu
def test_engine_on_cuda_graphs_same_greedy_tokens_fused_and_eager(tiny_ckpt, monkeypatch):
    model = load_model(tiny_ckpt, dtype=torch.float32, device="cuda").eval()
    prompts = [(torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)), None, None) for n in (7, 19, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for backend in ("torch", "auto"):  # auto on CUDA: the fused decoder, inside the decode graphs
        monkeypatch.setenv("RLPT_KERNELS_BACKEND", backend)
        got = Engine(model).generate([Request(*p) for p in prompts], params)
        outs[backend] = [o[0].token_ids for o in got]
    assert outs["auto"] == outs["torch"]
