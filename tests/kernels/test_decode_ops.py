"""The decoder's fused inference ops (rlpt_kernels.decode_ops) against the eager-torch reference
and fp64: in Triton's interpreter on CPU (fp32), and in bf16 on a GPU (error at most twice plain
torch bf16's, against fp64)."""
import pytest
import torch

from rlpt_kernels import reference
from rlpt_kernels.decode_ops import add_rms_norm, rms_norm, rotary, silu_mul


def _randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _tables(n, d, seed, dtype, device):
    """cos, signed sin (N, 1, D) as rope.rotary_tables makes them, at random positions."""
    from rlpt_fast.model.rope import inv_freq, rotary_tables

    pos = torch.randint(0, 4000, (n,), generator=torch.Generator().manual_seed(seed)).double()
    freqs = pos[:, None] * inv_freq(d, 1e6).double()
    emb = torch.cat([freqs, freqs], -1)
    return rotary_tables(emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device))


def _rms64(x, w, eps):
    x = x.double()
    return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("hidden", [37, 96, 130])
def test_add_rms_norm_and_rms_norm_match_reference_and_fp64(rows, hidden, device):
    x = _randn(rows, hidden, seed=hidden + rows, device=device)
    res = _randn(rows, hidden, seed=hidden * rows + 1, device=device, scale=4.0)
    w = _randn(hidden, seed=hidden, device=device) * 0.5 + 1.0
    eps = 1e-6
    normed, stream = add_rms_norm(x, res, w, eps)
    ref_normed, ref_stream = reference.add_rms_norm(x, res, w, eps)
    torch.testing.assert_close(stream, ref_stream, rtol=0, atol=0)  # one fp32 add: exact
    torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normed.double(), _rms64(x.double() + res.double(), w, eps), rtol=1e-5, atol=1e-6)
    plain = rms_norm(x, w, eps)
    assert plain.shape == x.shape and plain.dtype == torch.float32
    torch.testing.assert_close(plain, reference.rms_norm(x, w, eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.double(), _rms64(x, w, eps), rtol=1e-5, atol=1e-6)


def test_rms_norm_strided_rows_3d_input_and_errors(device):
    base = _randn(5, 2, 96, seed=7, device=device)
    x = base[:, 1]  # rows 192 apart
    w = _randn(96, seed=8, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rms_norm(base, w, 1e-5), reference.rms_norm(base, w, 1e-5), rtol=1e-5, atol=1e-6)
    assert rms_norm(base[:0], w, 1e-5).shape == (0, 2, 96)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w[:95], 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, base[:4, 0], w, 1e-5)


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("inner", [37, 130, 2500])
def test_silu_mul_matches_reference_and_fp64(rows, inner, device):
    gate_up = _randn(rows, 2 * inner, seed=inner + rows, device=device, scale=3.0)
    gate, up = gate_up[:, :inner], gate_up[:, inner:]  # strided halves, as one gate_up output gives
    ours = silu_mul(gate, up)
    assert ours.shape == (rows, inner) and ours.is_contiguous()
    torch.testing.assert_close(ours, reference.silu_mul(gate, up), rtol=1e-6, atol=1e-6)
    exact = torch.nn.functional.silu(gate.double()) * up.double()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one shape and dtype"):
        silu_mul(gate, up[:, 1:])


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("head_dim,hq,hk", [(8, 3, 1), (16, 5, 5), (64, 7, 3), (12, 2, 1)])
def test_rotary_matches_reference_and_fp64(rows, head_dim, hq, hk, device):
    qkv = _randn(rows, (hq + 2 * hk) * head_dim, seed=rows + head_dim, device=device)  # one projection
    q = qkv[:, :hq * head_dim].view(rows, hq, head_dim)            # views with the token stride of qkv
    k = qkv[:, hq * head_dim:(hq + hk) * head_dim].view(rows, hk, head_dim)
    cos, sin = _tables(rows, head_dim, seed=rows, dtype=torch.float32, device=device)
    q_out, k_out = rotary(q, k, cos, sin)
    q_ref, k_ref = reference.rotary(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    for x, out in ((q, q_out), (k, k_out)):  # the textbook rotation in fp64
        half = head_dim // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1).double()
        unsigned_sin = torch.cat([-sin[..., :half], sin[..., half:]], -1).double()
        exact = x.double() * cos.double() + rot * unsigned_sin
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_rotary_rejects_mismatched_shapes(device):
    q, k = _randn(2, 3, 8, seed=1, device=device), _randn(2, 1, 6, seed=2, device=device)
    cos, sin = _tables(2, 8, seed=0, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="even D"):
        rotary(q, k, cos, sin)
    with pytest.raises(ValueError, match="cos must be"):
        rotary(q, q[:, :1], cos[:1], sin)


# ---- where bf16 rounds ----------------------------------------------------------------------
def _truncate(t):
    """fp32 -> bf16 -> fp32 rounding toward zero (the interpreter's conversion, Triton 3.8)."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _nearest_even(t):
    """fp32 -> bf16 -> fp32 rounding to nearest even (torch's and the GPU's conversion)."""
    return t.float().to(torch.bfloat16).float()


def _one_of_the_roundings(out, emulate):
    """out equals, bit for bit, the eager op sequence with every rounding done one way or the other."""
    return any(torch.equal(out.float(), emulate(r)) for r in (_truncate, _nearest_even))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter only (conftest sets it); the GPU "
                    "tests below compare with eager bf16 directly")
def test_bf16_rounds_where_eager_rounds():
    """bf16 in, bf16 out: the kernels compute in fp32 and round at each point the eager bf16 ops
    round (the interpreter's conversion truncates, so eager torch itself is not the reference)."""
    bf = torch.bfloat16
    x, res = _randn(5, 96, seed=1, dtype=bf), _randn(5, 96, seed=2, dtype=bf, scale=8.0)
    w = (_randn(96, seed=3) * 0.3 + 1).to(bf)
    normed, stream = add_rms_norm(x, res, w, 1e-6)

    def norm(r):
        st = r(x.float() + res.float())
        return r(w.float() * r(st * torch.rsqrt(st.pow(2).mean(-1, keepdim=True) + 1e-6)))

    assert _one_of_the_roundings(stream, lambda r: r(x.float() + res.float()))
    assert _one_of_the_roundings(normed, norm)
    gate, up = _randn(5, 130, seed=4, dtype=bf, scale=3.0), _randn(5, 130, seed=5, dtype=bf)
    act = lambda r: r(r(torch.nn.functional.silu(gate.float())) * up.float())  # noqa: E731
    assert _one_of_the_roundings(silu_mul(gate, up), act)
    q, k = _randn(3, 5, 16, seed=6, dtype=bf), _randn(3, 1, 16, seed=7, dtype=bf)
    cos, sin = _tables(3, 16, seed=8, dtype=bf, device="cpu")
    for x_in, out in zip((q, k), rotary(q, k, cos, sin)):
        rot = lambda r, t=x_in: r(r(t.float() * cos.float()) + r(t.float().roll(8, -1) * sin.float()))  # noqa: E731
        assert _one_of_the_roundings(out, rot)


# ---- bf16 on the device ---------------------------------------------------------------------
def _rel(a, exact):
    assert torch.isfinite(a).all()
    return ((a.double() - exact).norm() / exact.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2048, 3584])
def test_bf16_add_rms_norm(hidden):
    x = _randn(128, hidden, seed=1, dtype=torch.bfloat16, device="cuda")
    res = _randn(128, hidden, seed=2, dtype=torch.bfloat16, device="cuda", scale=8.0)
    w = (_randn(hidden, seed=3) * 0.3 + 1).to(torch.bfloat16).cuda()
    normed, stream = add_rms_norm(x, res, w, 1e-6)
    plain_normed, plain_stream = reference.add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(stream, plain_stream)  # one rounding of the same fp32 sum
    exact = _rms64(stream, w, 1e-6)
    assert _rel(normed, exact) <= 2 * _rel(plain_normed, exact)
    assert _rel(rms_norm(x, w, 1e-6), _rms64(x, w, 1e-6)) <= 2 * _rel(reference.rms_norm(x, w, 1e-6), _rms64(x, w, 1e-6))
    # the same rounding points as eager: a flip of the inner rounding then the outer one at most
    assert (normed.float() - plain_normed.float()).abs().le(plain_normed.float().abs() * 2 ** -6 + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.parametrize("inner", [11008, 18944])
def test_bf16_silu_mul(inner):
    gate = _randn(128, inner, seed=4, dtype=torch.bfloat16, device="cuda", scale=3.0)
    up = _randn(128, inner, seed=5, dtype=torch.bfloat16, device="cuda")
    exact = torch.nn.functional.silu(gate.double()) * up.double()
    ours, plain = silu_mul(gate, up), reference.silu_mul(gate, up)
    assert _rel(ours, exact) <= 2 * _rel(plain, exact)
    assert (ours != plain).float().mean() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(16, 2), (28, 4)])
def test_bf16_rotary(hq, hk):
    q = _randn(128, hq, 128, seed=6, dtype=torch.bfloat16, device="cuda")
    k = _randn(128, hk, 128, seed=7, dtype=torch.bfloat16, device="cuda")
    cos, sin = _tables(128, 128, seed=8, dtype=torch.bfloat16, device="cuda")
    ours, plain = rotary(q, k, cos, sin), reference.rotary(q, k, cos, sin)
    for o, p, x in zip(ours, plain, (q, k)):
        exact = x.double() * cos.double() + x.double().roll(64, -1) * sin.double()
        assert _rel(o, exact) <= 2 * _rel(p, exact)
        assert torch.equal(o, p)  # products and sum rounded where eager rounds them: bit for bit
