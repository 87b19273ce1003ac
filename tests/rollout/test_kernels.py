"""Paged-cache kernels: Triton (interpreter on CPU, fp32, small shapes) against the torch
references, and both against a dense float64 computation of attention from the raw K/V."""
import pytest
import torch

from rlpt_fast.rollout.decode_attention import (
    choose_num_splits,
    decode_attention,
    decode_attention_reference,
)
from rlpt_fast.rollout.kv_store import (
    rotary_store_kv,
    rotary_store_kv_reference,
    store_kv,
    store_kv_reference,
)
from rlpt_kernels import reference as kernel_reference
from rlpt_fast.rollout.prefill_attention import PrefillMeta, prefill_attention


def paged(context_lens, num_blocks, block_size, hkv, d, device, gen):
    """Random K/V per sequence scattered into shuffled cache blocks; unused cache rows are NaN."""
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-c // block_size) for c in context_lens)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    dense = []
    for b, c in enumerate(context_lens):
        nb = -(-c // block_size)
        tables[b, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
        k = torch.randn(c, hkv, d, generator=gen, dtype=torch.float64)
        v = torch.randn(c, hkv, d, generator=gen, dtype=torch.float64)
        t = torch.arange(c)
        k_cache[tables[b, t // block_size].long(), t % block_size] = k.float().to(device)
        v_cache[tables[b, t // block_size].long(), t % block_size] = v.float().to(device)
        dense.append((k, v))
    return k_cache, v_cache, tables.to(device), dense


def dense_decode(q, dense, scale):
    out = []
    for b, (k, v) in enumerate(dense):
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.einsum("hd,thd->ht", q[b].double().cpu() * scale, k)
        out.append(torch.einsum("ht,thd->hd", s.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (4, 2, 16), (8, 2, 32), (6, 2, 16)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_matches_reference_and_dense(hq, hkv, d, num_splits, device):
    gen = torch.Generator().manual_seed(hq * 100 + d + num_splits)
    lens = [1, 7, 40, 100]
    k_cache, v_cache, tables, dense = paged(lens, 40, 8, hkv, d, device, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = d ** -0.5
    want = dense_decode(q, dense, scale)
    ref = decode_attention_reference(q, k_cache, v_cache, tables, ctx, scale)
    tri = decode_attention(q, k_cache, v_cache, tables, ctx, scale, num_splits=num_splits)
    torch.testing.assert_close(ref.double().cpu(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(tri.double().cpu(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_decode_attention_low_precision_matches_reference(dtype, device):
    # bf16 dots are wrong in Triton's CPU interpreter: bf16 runs on the GPU only (DESIGN.md)
    gen = torch.Generator().manual_seed(5)
    lens = [33, 9]
    k_cache, v_cache, tables, _ = paged(lens, 12, 8, 2, 16, device, gen)
    k_cache, v_cache = k_cache.nan_to_num().to(dtype), v_cache.nan_to_num().to(dtype)
    q = torch.randn(2, 4, 16, generator=gen).to(device).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    ref = decode_attention_reference(q, k_cache, v_cache, tables, ctx, 0.25)
    tri = decode_attention(q, k_cache, v_cache, tables, ctx, 0.25, num_splits=2)
    assert tri.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(tri.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", [store_kv, store_kv_reference])
def test_store_kv_writes_slots_and_skips_minus_one(impl, device):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(6, 4, 2, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(5, 2, 16, generator=gen).to(device)
    v = torch.randn(5, 2, 16, generator=gen).to(device)
    slots = torch.tensor([3, 17, -1, 0, 23], device=device)
    impl(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[i]) and torch.equal(flat_v[s], v[i])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(24) if s not in written]
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0


@pytest.mark.parametrize("impl", [store_kv, store_kv_reference])
def test_store_kv_reads_column_slices_of_a_packed_projection(impl, device):
    """k and v as the packed q/k/v GEMM's output gives them: token rows strided by q + k + v widths;
    and a transposed k whose head blocks are not contiguous (copied first)."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 3 * 32 + 2 * 32, generator=gen).to(device)  # q: 3 heads, k and v: 2 heads of 16
    k, v = qkv[:, 96:128].view(5, 2, 16), qkv[:, 128:].view(5, 2, 16)
    assert not v.is_contiguous()
    k_cache = torch.zeros(4, 4, 2, 16, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, 0, 9, 2, 15], device=device)
    impl(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, 2, 16)[slots], k) and torch.equal(v_cache.view(-1, 2, 16)[slots], v)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # strides (32, 1, 2): head dim not contiguous
    impl(k_t, v, k_cache, v_cache, slots.flip(0))
    assert torch.equal(k_cache.view(-1, 2, 16)[slots.flip(0)], k)


def _rotary_tables(n, d, gen, dtype, device):
    """cos, signed sin (N, 1, D) as rope.rotary_tables makes them, at random positions."""
    from rlpt_fast.model.rope import inv_freq, rotary_tables
    freqs = torch.randint(0, 4000, (n,), generator=gen).double()[:, None] * inv_freq(d, 1e6).double()
    emb = torch.cat([freqs, freqs], -1)
    return rotary_tables(emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device))


@pytest.mark.parametrize("impl", [rotary_store_kv, rotary_store_kv_reference])
@pytest.mark.parametrize("hq,hkv,d", [(7, 1, 6), (6, 3, 10), (4, 2, 16)])
def test_rotary_store_kv_rotates_and_caches_in_one_pass(impl, hq, hkv, d, device):
    """q, k, v as views of one packed projection (token rows strided); slot -1 stores nothing;
    the rotation is rlpt_kernels.rotary's and the fp64 textbook one's; v is cached as given."""
    gen = torch.Generator().manual_seed(hq * d + hkv)
    n, block = 5, 4
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(device)
    q = qkv[:, :hq * d].view(n, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
    cos, sin = _rotary_tables(n, d, gen, torch.float32, device)
    k_cache = torch.full((4, block, hkv, d), 7.0, device=device)
    v_cache = torch.full_like(k_cache, 7.0)
    slots = torch.tensor([6, 0, -1, 13, 2], device=device)
    q_out, k_out = impl(q, k, v, cos, sin, k_cache, v_cache, slots)
    q_ref, k_ref = kernel_reference.rotary(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, k_ref, rtol=1e-6, atol=1e-6)
    half = d // 2
    for x, out in ((q, q_out), (k, k_out)):
        rot = torch.cat([-x[..., half:], x[..., :half]], -1).double()
        exact = x.double() * cos.double() + rot * torch.cat([-sin[..., :half], sin[..., half:]], -1).double()
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)
    keep = slots >= 0
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    assert torch.equal(flat_k[slots[keep]], k_out[keep]) and torch.equal(flat_v[slots[keep]], v[keep])
    untouched = [s for s in range(4 * block) if s not in slots.tolist()]
    assert bool((flat_k[untouched] == 7.0).all()) and bool((flat_v[untouched] == 7.0).all())


def test_rotary_store_kv_rejects_bad_arguments(device):
    q, k = torch.zeros(2, 4, 8, device=device), torch.zeros(2, 2, 8, device=device)
    cos, sin = torch.ones(2, 1, 8, device=device), torch.zeros(2, 1, 8, device=device)
    cache = torch.zeros(3, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="rotary_store_kv: slot_mapping must be"):
        rotary_store_kv(q, k, k, cos, sin, cache, cache.clone(), torch.tensor([0], device=device))
    with pytest.raises(ValueError, match="rotary_store_kv: cos must be"):
        rotary_store_kv(q, k, k, cos[:1], sin, cache, cache.clone(), torch.tensor([0, 1], device=device))


@pytest.mark.gpu
def test_bf16_rotary_store_kv_is_rotary_then_store_bit_for_bit():
    """On the device, in bf16 at a 3B layer's shape: the fused launch gives exactly what
    rlpt_kernels.rotary and store_kv give one after the other."""
    from rlpt_kernels.decode_ops import rotary
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(128, 20 * 128, generator=gen).to("cuda", torch.bfloat16)  # 16 q heads, 2 kv heads
    q, k, v = qkv[:, :2048].view(128, 16, 128), qkv[:, 2048:2304].view(128, 2, 128), qkv[:, 2304:].view(128, 2, 128)
    cos, sin = _rotary_tables(128, 128, gen, torch.bfloat16, "cuda")
    slots = torch.randperm(512, generator=gen)[:128].cuda()
    fused = [torch.zeros(32, 16, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    apart = [c.clone() for c in fused]
    q_fused, k_fused = rotary_store_kv(q, k, v, cos, sin, *fused, slots)
    q_apart, k_apart = rotary(q, k, cos, sin)
    store_kv(k_apart, v, *apart, slots)
    assert torch.equal(q_fused, q_apart) and torch.equal(k_fused, k_apart)
    assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])


def test_store_kv_rejects_wrong_dtype():
    k = torch.zeros(2, 2, 16)
    cache = torch.zeros(2, 4, 2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        store_kv_reference(k, k, cache, cache.clone(), torch.tensor([0, 1]))


def test_prefill_attention_with_cached_prefix_matches_dense():
    gen = torch.Generator().manual_seed(1)
    hq, hkv, d, bs = 4, 2, 16, 4
    lens, cached = [11, 6], [0, 3]  # second sequence: 3 tokens cached, 3 new
    k_cache, v_cache, tables, dense = paged(lens, 10, bs, hkv, d, "cpu", gen)
    new = [c - p for c, p in zip(lens, cached)]
    q = torch.randn(sum(new), hq, d, generator=gen)
    k = torch.cat([dk[p:].float() for (dk, _), p in zip(dense, cached)])
    v = torch.cat([dv[p:].float() for (_, dv), p in zip(dense, cached)])
    slots = [tables[i, torch.arange(c) // bs].long() * bs + torch.arange(c) % bs for i, c in enumerate(lens)]
    meta = PrefillMeta(cu_q=[0, new[0], sum(new)], num_cached=cached, slots=slots)
    out = prefill_attention(q, k, v, k_cache, v_cache, meta, d ** -0.5)
    lo = 0
    for (dk, dv), c, p in zip(dense, lens, cached):
        for j in range(c - p):  # query j sees keys 0 .. p + j
            want = dense_decode(q[lo + j][None], [(dk[:p + j + 1], dv[:p + j + 1])], d ** -0.5)[0]
            torch.testing.assert_close(out[lo + j].double(), want, atol=2e-5, rtol=1e-5)
        lo += c - p


def test_choose_num_splits_fills_the_gpu_and_keeps_splits_long():
    assert choose_num_splits(1, 8, 4096, 132) == 16
    assert choose_num_splits(64, 2, 4096, 132) == 3
    assert choose_num_splits(1, 8, 100, 132) == 1


def test_cascade_decode_reads_shared_prefix_once_and_matches_reference():
    from rlpt_fast.rollout.cascade_attention import build_cascade, cascade_decode_attention

    gen = torch.Generator().manual_seed(3)
    bs, hq, hkv, d = 4, 4, 2, 16
    k_cache = torch.randn(40, bs, hkv, d, generator=gen)
    v_cache = torch.randn(40, bs, hkv, d, generator=gen)
    k_cache[30:] = float("nan")  # never referenced: must not leak
    v_cache[30:] = float("nan")
    # group A: 3 samples sharing blocks [0, 1, 2] (+ own tails); group B: 2 samples sharing [5];
    # a lone row; a row of group A that was recomputed (shares nothing)
    tables = [[0, 1, 2, 10], [0, 1, 2, 11, 12], [0, 1, 2, 13], [5, 14], [5, 15, 16], [20, 21], [22, 23, 24, 25]]
    lens = [14, 20, 13, 6, 9, 7, 15]
    meta = build_cascade(tables, lens, bs, "cpu")
    assert meta.prefix_lens.tolist() == [12, 4]   # A's 3 shared blocks (row 6 is not among them), B's 1
    assert meta.row_member.tolist()[5:] == [6, 6]  # rows without a shared prefix: the dummy
    q = torch.randn(len(lens), hq, d, generator=gen)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    want = decode_attention_reference(q, k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5)
    got = cascade_decode_attention(q, k_cache, v_cache, meta, d ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert build_cascade([[1, 2], [3, 4]], [8, 8], bs, "cpu") is None
    assert build_cascade([[1, 2], [1, 4]], [5, 5], bs, "cpu").prefix_lens.tolist() == [4]
    assert build_cascade([[1, 2], [1, 4]], [4, 5], bs, "cpu") is None  # block 1 still being written by row 0


def test_cascade_grouping_carries_over_to_the_next_step():
    from rlpt_fast.rollout.cascade_attention import build_cascade, cascade_decode_attention

    gen = torch.Generator().manual_seed(4)
    k_cache = torch.randn(20, 4, 2, 16, generator=gen)
    v_cache = torch.randn(20, 4, 2, 16, generator=gen)
    tables = [[0, 1, 5, 6], [0, 1, 7, 8], [2, 3]]
    q = torch.randn(3, 4, 16, generator=gen)
    old = build_cascade(tables, [13, 13, 6], 4, "cpu")
    for lens in ([14, 13, 7], [16, 15, 8]):
        want = cascade_decode_attention(q, k_cache, v_cache, build_cascade(tables, lens, 4, "cpu"), 0.25)
        torch.testing.assert_close(cascade_decode_attention(q, k_cache, v_cache, old.with_lens(lens), 0.25), want)


@pytest.mark.parametrize("hq,hkv,splits,prefix_splits", [(4, 2, 1, 1), (6, 2, 2, 3), (8, 1, 3, 2)])
def test_triton_cascade_decode_matches_reference(hq, hkv, splits, prefix_splits, device, poisoned_empty):
    """Rows 5 and 6 share nothing: their prefix partials stay empty, never read as values."""
    from rlpt_fast.rollout.cascade_attention import (
        PrefixGroups,
        build_cascade,
        cascade_decode_attention_triton,
        prefix_groups,
    )

    gen = torch.Generator().manual_seed(hq + splits)
    bs, d = 4, 16
    k_cache = torch.randn(40, bs, hkv, d, generator=gen)
    v_cache = torch.randn(40, bs, hkv, d, generator=gen)
    k_cache[30:] = float("nan")
    v_cache[30:] = float("nan")
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    tables = [[0, 1, 2, 10], [0, 1, 2, 11, 12], [0, 1, 2, 13], [5, 14], [5, 15, 16], [20, 21], [22, 23, 24, 25]]
    lens = [14, 20, 13, 6, 9, 7, 15]
    groups = prefix_groups(build_cascade(tables, lens, bs, device), hq // hkv, hkv, 1)
    assert groups.max_prefix == 12
    # padding items point at the trailing group of prefix length 0 (as the CUDA graphs' static buffers do)
    pad = torch.tensor([[groups.lens.shape[0] - 1, 0]] * 2, dtype=torch.int32, device=device)
    groups = PrefixGroups(groups.starts, groups.tables, groups.lens, groups.members,
                          torch.cat([groups.items, pad]), prefix_splits, groups.max_prefix)
    q = torch.randn(len(lens), hq, d, generator=gen).to(device)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    want = decode_attention_reference(q, k_cache, v_cache, bt, ctx, d ** -0.5)
    got = cascade_decode_attention_triton(q, k_cache, v_cache, bt, ctx, groups, d ** -0.5, splits, width * bs)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_cascade_dense_suffix_copy_follows_new_tokens():
    """Across steps of one grouping, the kept suffix copy extended by each step's k/v gives what a
    fresh gather from the cache gives."""
    from rlpt_fast.rollout.cascade_attention import build_cascade, cascade_decode_attention

    gen = torch.Generator().manual_seed(6)
    k_cache = torch.randn(20, 4, 2, 16, generator=gen)
    v_cache = torch.randn(20, 4, 2, 16, generator=gen)
    tables = [[0, 1, 5, 6], [0, 1, 7, 8], [2, 3]]
    meta = build_cascade(tables, [13, 13, 6], 4, "cpu")
    lens = [13, 13, 6]
    for step in range(3):
        q = torch.randn(3, 4, 16, generator=gen)
        k_new = torch.randn(3, 2, 16, generator=gen)
        v_new = torch.randn(3, 2, 16, generator=gen)
        for r, n in enumerate(lens):  # store this step's token, as store_kv does before attention
            blk, off = tables[r][(n - 1) // 4], (n - 1) % 4
            k_cache[blk, off], v_cache[blk, off] = k_new[r], v_new[r]
        kept = meta if step == 0 else meta.with_lens(lens)
        got = cascade_decode_attention(q, k_cache, v_cache, kept, 0.25, {}, 0, (k_new, v_new))
        fresh = cascade_decode_attention(q, k_cache, v_cache, build_cascade(tables, lens, 4, "cpu"), 0.25)
        torch.testing.assert_close(got, fresh)
        meta = kept
        lens = [n + 1 for n in lens]


@pytest.mark.parametrize("in_order", [True, False])
def test_cascade_kept_copies_follow_steps_and_new_blocks(in_order):
    """The torch cascade's kept dense copies (groups' layout when the rows are the groups in order,
    per row otherwise), over steps that cross into new blocks (regrouped, copies carried over),
    with groups whose prompts differ in length: every step equals decode attention over the cache."""
    from rlpt_fast.rollout.cascade_attention import build_cascade
    from rlpt_fast.rollout.cascade_torch import cascade_decode_attention, carry_dense_kv

    gen = torch.Generator().manual_seed(7)
    bs, hq, hkv, d = 4, 4, 2, 16
    k_cache = torch.randn(64, bs, hkv, d, generator=gen)
    v_cache = torch.randn(64, bs, hkv, d, generator=gen)
    # group A (prompt 8 tokens, blocks 0-1) and group B (prompt 6: block 2 full + partial 3), 2 samples each
    tables = [[0, 1, 10], [0, 1, 11], [2, 12], [2, 13]] if in_order else [[0, 1, 10], [2, 12], [0, 1, 11], [2, 13]]
    lens = [9, 9, 6, 6] if in_order else [9, 6, 9, 6]
    free = iter(range(20, 64))
    meta = build_cascade(tables, lens, bs, "cpu")
    assert meta.in_order == in_order
    for step in range(7):
        q = torch.randn(4, hq, d, generator=gen)
        k_new = torch.randn(4, hkv, d, generator=gen)
        v_new = torch.randn(4, hkv, d, generator=gen)
        for r, n in enumerate(lens):  # store this step's token, as store_kv does before attention
            blk, off = tables[r][(n - 1) // bs], (n - 1) % bs
            k_cache[blk, off], v_cache[blk, off] = k_new[r], v_new[r]
        got = cascade_decode_attention(q, k_cache, v_cache, meta, d ** -0.5, {}, 0, (k_new, v_new))
        width = max(map(len, tables))
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        want = decode_attention_reference(q, k_cache, v_cache, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        lens = [n + 1 for n in lens]
        grew = False
        for r, n in enumerate(lens):
            if (n - 1) // bs == len(tables[r]):
                tables[r] = tables[r] + [next(free)]
                grew = True
        if grew:
            new = build_cascade(tables, lens, bs, "cpu")
            carry_dense_kv(meta, new)
            assert ("prefix", 0) in new.prefix_kv and ("suffix", 0) in new.prefix_kv
            meta = new
        else:
            meta = meta.with_lens(lens)
