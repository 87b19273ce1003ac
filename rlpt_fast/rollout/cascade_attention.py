"""Decode attention that reads a forked group's shared prompt once, not once per sample.

After a prompt is forked into n samples, their block tables start with the same physical blocks
(the prompt's full blocks). Plain paged decode reads those blocks n times per step. Here the
context of each row splits into
    prefix: the blocks its group shares (read once per group, attended by all n rows' queries)
    suffix: the rest of its own context (its partial prompt block and its own tokens)
and the two partial softmaxes are merged by their log-sum-exp:
    out = (o_p * exp(lse_p - m) + o_s * exp(lse_s - m)) / (exp(lse_p - m) + exp(lse_s - m)).
Two implementations with the same math: torch (cascade_torch.py: dense copies + batched matmuls;
the backend on CPUs) and Triton (the backend on GPUs), two launches per layer. The first runs both
partial passes side by side in one 1-D grid (a decode step at batch 64-128 is launch-bound, and
one grid fills the GPU where two would each leave it half idle): prefix programs, one per (group,
member chunk, KV head, prefix split) with up to BLOCK_M query rows (members x grouped heads, so the
dots are real matrix products), then suffix programs, decode_attention's per-row split programs
reading each row's own tokens from `starts`. The combine kernel merges all partials.
"""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from rlpt_fast.rollout.cascade_torch import cascade_decode_attention  # noqa: F401 (the torch form)
from rlpt_fast.rollout.decode_attention import (
    _attend,
    _check,
    _split_program,
    choose_num_splits,
    combine_partials,
    split_constexprs,
    split_length,
)


@dataclass
class CascadeMeta:
    """prefix_tables (NG, Wp) int64 and prefix_lens (NG,): each group's shared blocks and their
    token count (> 0); members (NG, M) int64: the rows of each group (padding: row B, a dummy);
    suffix_tables (B, Ws) int64 and suffix_lens (B,) (>= 1): each row's remaining blocks/tokens;
    row_member (B,) int64: index of the row in members.flatten(), or NG*M if it has no group.
    suffix_start: host list, tokens each row leaves to its group's prefix; starts: the same (B,)
    int32 on the device; member_counts: host list, members of each group. Host copies for the
    torch path: prefix_lens_host, suffix_lens_host, tables_host (each group's prefix blocks, then
    each row's suffix blocks, unpadded); block_size; in_order: members is exactly
    arange(B).view(NG, M) (every row grouped, groups in row order, as a fork lays them out)."""
    prefix_tables: torch.Tensor
    prefix_lens: torch.Tensor
    members: torch.Tensor
    suffix_tables: torch.Tensor
    suffix_lens: torch.Tensor
    row_member: torch.Tensor
    suffix_start: list[int]
    starts: torch.Tensor
    member_counts: list[int]
    prefix_lens_host: list[int]
    suffix_lens_host: list[int]
    tables_host: tuple[list[list[int]], list[list[int]]]
    block_size: int
    in_order: bool
    # torch path: each layer's dense K/V copies, kept while the grouping lives (shared full blocks
    # are never written: copy-on-write), shared by the with_lens copies
    prefix_kv: dict = field(default_factory=dict)

    def with_lens(self, lens: list[int]) -> CascadeMeta:
        """The same grouping for the next step of the same rows (block tables unchanged): contexts
        only grow, so the shared prefixes stay valid; only the suffix lengths move."""
        host = [n - s for n, s in zip(lens, self.suffix_start)]
        out = copy(self)  # every field shared but these two (dataclasses.replace re-runs __init__: slower)
        out.suffix_lens, out.suffix_lens_host = torch.tensor(host).to(self.suffix_lens.device, non_blocking=True), host
        return out


def build_cascade(tables: list[list[int]], lens: list[int], block_size: int, device) -> CascadeMeta | None:
    """tables/lens: each row's block table and context length. Rows whose first block is the same
    physical block form a group (the samples of one prompt, or prefix-cache hits); the group's
    prefix is its common leading blocks, all full. None when no group shares a block."""
    by_first: dict[int, list[int]] = {}
    for r, t in enumerate(tables):
        by_first.setdefault(t[0], []).append(r)
    shared = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        first, n = tables[rows[0]], min((lens[r] - 1) // block_size for r in rows)
        for r in rows[1:]:
            t, i = tables[r], 0
            if t[:n] == first[:n]:  # the usual case (the samples of one prompt), at C speed
                continue
            while i < n and t[i] == first[i]:
                i += 1
            n = i
        if n:  # n >= 1: a grouped row's start (n blocks) is > 0, an ungrouped row's 0 (see _cascade_partials_kernel)
            shared.append((rows, n))
    if not shared:
        return None
    b, m = len(tables), max(len(rows) for rows, _ in shared)
    skip = [0] * b
    members, row_member = [], [len(shared) * m] * b
    for g, (rows, n) in enumerate(shared):
        members.append(rows + [b] * (m - len(rows)))
        for j, r in enumerate(rows):
            skip[r], row_member[r] = n, g * m + j
    pad = lambda ts: [t + [0] * (max(map(len, ts)) - len(t)) for t in ts]
    prefix_host, suffix_host = [tables[rows[0]][:n] for rows, n in shared], [t[s:] for t, s in zip(tables, skip)]
    prefix, suffix = pad(prefix_host), pad(suffix_host)
    as_t = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)
    start = [s * block_size for s in skip]
    prefix_lens, suffix_lens = [n * block_size for _, n in shared], [n - s for n, s in zip(lens, start)]
    in_order = [r for row in members for r in row] == list(range(b))
    return CascadeMeta(as_t(prefix), as_t(prefix_lens), as_t(members), as_t(suffix), as_t(suffix_lens),
                       as_t(row_member), start, as_t(start).int(), [len(rows) for rows, _ in shared],
                       prefix_lens, suffix_lens, (prefix_host, suffix_host), block_size, in_order)


BLOCK_M = 64  # query rows (members x grouped heads) per prefix program


def work_items(member_counts: list[int], group: int) -> list[tuple[int, int]]:
    """(group, first member) of every prefix program: BLOCK_M // group members each."""
    step = max(1, BLOCK_M // group)
    return [(g, j) for g, c in enumerate(member_counts) for j in range(0, c, step)]


@triton.jit
def _prefix_program(Q, K, V, PTables, PLens, Members, Items, Starts, O, Lse, item, kvh, split, scale,
                    tokens_per_split, slot0, num_rows, num_member_cols, stride_qb, stride_qh, stride_kb,
                    stride_ks, stride_kh, stride_pt, stride_mg, stride_ob, stride_oh, stride_os, stride_lb,
                    stride_lh, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
    """One (work item, KV head, prefix split) program: the item's members x the G query heads of
    kvh over its group's prefix tokens of this split, into partial slot slot0 + split of each
    member row with Starts > 0 (lse -inf where the split's range is empty)."""
    grp = tl.load(Items + 2 * item).to(tl.int64)
    j0 = tl.load(Items + 2 * item + 1).to(tl.int64)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, tl.load(PLens + grp).to(tl.int64))
    r = tl.arange(0, BLOCK_M)
    j = j0 + r // GROUP
    heads = kvh * GROUP + r % GROUP
    rows = tl.load(Members + grp * stride_mg + j, mask=j < num_member_cols, other=num_rows).to(tl.int64)
    live = (rows < num_rows) & (r < (BLOCK_M // GROUP) * GROUP)
    # a row owns its prefix slots by Starts > 0, as the split programs decide their -inf fill: a
    # member padding that names a real row (CUDA graphs' buckets) never races that fill
    live = live & (tl.load(Starts + rows, mask=live, other=0) > 0)
    d = tl.arange(0, BLOCK_D)
    qmask = live[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(Q + rows[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
    q = (q.to(tl.float32) * scale).to(K.dtype.element_ty)                          # (M, D)
    out, lse = _attend(q, K, V, PTables + grp * stride_pt, start, end, kvh, stride_kb, stride_ks, stride_kh,
                       BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, IEEE)
    slot = slot0 + split
    tl.store(O + rows[:, None] * stride_ob + heads[:, None] * stride_oh + slot * stride_os + d[None, :], out, mask=qmask)
    tl.store(Lse + rows * stride_lb + heads * stride_lh + slot, lse, mask=live)


@triton.jit
def _cascade_partials_kernel(Q, K, V, Tables, Lens, Starts, PTables, PLens, Members, Items, O, Lse, scale,
                             tokens_per_split, prefix_tokens_per_split, num_splits, prefix_splits, num_kv_heads,
                             prefix_programs, num_rows, num_member_cols, stride_qb, stride_qh, stride_kb,
                             stride_ks, stride_kh, stride_tb, stride_pt, stride_mg, stride_ob, stride_oh,
                             stride_os, stride_lb, stride_lh,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             PAGE: tl.constexpr, IEEE: tl.constexpr):
    """Both partial passes in one 1-D launch: programs [0, prefix_programs) are the prefix pass
    (item, KV head, prefix split), the rest the suffix pass (row, KV head, split). The prefix
    programs come first: they are the longer ones (up to BLOCK_M query rows each), so the short
    suffix programs fill the tail of the wave.

    No program may rely on another's write in one launch, so each prefix slot (row, head,
    num_splits + e) has exactly one writer, chosen by Starts[row] alone. build_cascade gives a
    grouped row Starts = (shared blocks >= 1) x block_size > 0 and an ungrouped row 0. Starts > 0:
    the prefix programs write every slot (work_items covers each group's members, the grid every
    KV head and prefix split, and an empty split range writes lse -inf). Starts == 0: no prefix
    program writes (they mask such rows), the row's split-0 suffix programs write lse -inf."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < prefix_programs:
        split = pid % prefix_splits
        kvh = (pid // prefix_splits) % num_kv_heads
        item = pid // (prefix_splits * num_kv_heads)
        _prefix_program(Q, K, V, PTables, PLens, Members, Items, Starts, O, Lse, item, kvh, split, scale,
                        prefix_tokens_per_split, num_splits, num_rows, num_member_cols, stride_qb, stride_qh,
                        stride_kb, stride_ks, stride_kh, stride_pt, stride_mg, stride_ob, stride_oh, stride_os,
                        stride_lb, stride_lh, GROUP, BLOCK_M, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, IEEE)
    else:
        sid = pid - prefix_programs
        split = sid % num_splits
        kvh = (sid // num_splits) % num_kv_heads
        b = sid // (num_splits * num_kv_heads)
        first = tl.load(Starts + b).to(tl.int64)  # the tokens before are its group's prefix
        _split_program(Q, K, V, Tables + b * stride_tb, O, Lse, b, kvh, split, first,
                       tl.load(Lens + b).to(tl.int64), scale, tokens_per_split, stride_qb, stride_qh,
                       stride_kb, stride_ks, stride_kh, stride_ob, stride_oh, stride_os, stride_lb,
                       stride_lh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE, IEEE)
        # Starts == 0 (no group): empty prefix slots, lse -inf (weight 0 in the combine whatever
        # o_part holds); Starts > 0: the prefix programs' slots, a write here would race theirs
        if (split == 0) & (first == 0):
            g = tl.arange(0, BLOCK_G)
            for e in range(prefix_splits):
                tl.store(Lse + b * stride_lb + (kvh * GROUP + g) * stride_lh + num_splits + e, float("-inf"),
                         mask=g < GROUP)


@dataclass
class PrefixGroups:
    """Inputs of the Triton cascade (device tensors; host ints fixed per batch shape):
    starts (B,) int32; tables (G, Wp), lens (G,), members (G, M) as in CascadeMeta; items (I, 2)
    int32 from work_items, extra items pointing at a group of prefix length 0; splits: prefix
    splits; max_prefix: bound of lens."""
    starts: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    members: torch.Tensor
    items: torch.Tensor
    splits: int
    max_prefix: int


def cascade_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_tables: torch.Tensor, context_lens: torch.Tensor, groups: PrefixGroups,
                                    scale: float, num_splits: int, max_context: int) -> torch.Tensor:
    """Triton cascade decode. q (B, Hq, D); block_tables (B, W) int32 and context_lens (B,) int32
    as for decode_attention; groups.starts skips each row's shared prefix. Two launches: both
    partial passes into (B, Hq, num_splits + groups.splits) slots, then the combine. No device
    value is read on the host: CUDA-graph safe."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert hq // hkv <= BLOCK_M, f"cascade decode: {hq // hkv} query heads per KV head exceed BLOCK_M={BLOCK_M}"
    slots = num_splits + groups.splits
    o_part = torch.empty(b, hq, slots, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hq, slots, device=q.device, dtype=torch.float32)
    prefix_programs = groups.items.shape[0] * hkv * groups.splits
    _cascade_partials_kernel[(prefix_programs + b * hkv * num_splits,)](
        q, k_cache, v_cache, block_tables, context_lens, groups.starts, groups.tables, groups.lens, groups.members,
        groups.items, o_part, lse, scale, split_length(max_context, num_splits),
        split_length(groups.max_prefix, groups.splits), num_splits, groups.splits, hkv, prefix_programs, b,
        groups.members.shape[1], q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), groups.tables.stride(0), groups.members.stride(0), o_part.stride(0),
        o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1), BLOCK_M=BLOCK_M,
        **split_constexprs(q, k_cache))
    return combine_partials(o_part, lse, q.dtype)


def prefix_groups(meta: CascadeMeta, group: int, num_kv_heads: int, num_sms: int) -> PrefixGroups:
    """PrefixGroups for one step from a CascadeMeta, with a trailing empty group for padding."""
    dev = meta.members.device
    items = work_items(meta.member_counts, group)
    max_prefix = int(max(meta.suffix_start)) or 1
    pad_group = len(meta.member_counts)
    return PrefixGroups(meta.starts, torch.cat([meta.prefix_tables, meta.prefix_tables[:1]]),
                        torch.cat([meta.prefix_lens, meta.prefix_lens.new_zeros(1)]),
                        torch.cat([meta.members, meta.members.new_full((1, meta.members.shape[1]), meta.starts.shape[0])]),
                        torch.tensor(items or [(pad_group, 0)], dtype=torch.int32).to(dev, non_blocking=True),
                        choose_num_splits(max(1, len(items)), num_kv_heads, max_prefix, num_sms), max_prefix)
