"""Decode attention that reads a forked group's shared prompt once, not once per sample.

After a prompt is forked into n samples, their block tables start with the same physical blocks
(the prompt's full blocks). Plain paged decode reads those blocks n times per step. Here the
context of each row splits into
    prefix: the blocks its group shares (read once per group, attended by all n rows' queries)
    suffix: the rest of its own context (its partial prompt block and its own tokens)
and the two partial softmaxes are merged by their log-sum-exp:
    out = (o_p * exp(lse_p - m) + o_s * exp(lse_s - m)) / (exp(lse_p - m) + exp(lse_s - m)).
Torch (gather + batched matmuls), used by the torch backend; exact up to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlpt_fast.rollout.decode_attention import context_slots, gather_slots


@dataclass
class CascadeMeta:
    """prefix_tables (NG, Wp) int64 and prefix_lens (NG,): each group's shared blocks and their
    token count (> 0); members (NG, M) int64: the rows of each group (padding: row B, a dummy);
    suffix_tables (B, Ws) int64 and suffix_lens (B,) (>= 1): each row's remaining blocks/tokens;
    row_member (B,) int64: index of the row in members.flatten(), or NG*M if it has no group.
    suffix_start: host list, tokens each row leaves to its group's prefix."""
    prefix_tables: torch.Tensor
    prefix_lens: torch.Tensor
    members: torch.Tensor
    suffix_tables: torch.Tensor
    suffix_lens: torch.Tensor
    row_member: torch.Tensor
    suffix_start: list[int]

    def with_lens(self, lens: list[int]) -> "CascadeMeta":
        """The same grouping for the next step of the same rows (block tables unchanged): contexts
        only grow, so the shared prefixes stay valid; only the suffix lengths move."""
        suffix = torch.tensor([n - s for n, s in zip(lens, self.suffix_start)])
        return replace(self, suffix_lens=suffix.to(self.suffix_lens.device, non_blocking=True))


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
            while i < n and t[i] == first[i]:
                i += 1
            n = i
        if n:
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
    pad = lambda ts: [t + [0] * (max(map(len, ts)) - len(t)) for t in ts]  # noqa: E731
    prefix = pad([tables[rows[0]][:n] for rows, n in shared])
    suffix = pad([t[s:] for t, s in zip(tables, skip)])
    as_t = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
    start = [s * block_size for s in skip]
    return CascadeMeta(as_t(prefix), as_t([n * block_size for _, n in shared]), as_t(members), as_t(suffix),
                       as_t([n - s for n, s in zip(lens, start)]), as_t(row_member), start)


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, invalid: torch.Tensor, scale: float):
    """q (X, Hkv, Q, D), k/v (X, Hkv, T, D), invalid (X, 1, 1, T) with >= 1 valid key per row
    -> (out (X, Hkv, Q, D), lse (X, Hkv, Q)). One exp pass: p = exp(s - max), lse = max + log sum p."""
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    s = s.masked_fill_(invalid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)
    return torch.matmul(p, v).div_(total), (m + total.log()).squeeze(-1)


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: CascadeMeta, scale: float, gathered: dict | None = None) -> torch.Tensor:
    """q (B, Hq, D); caches (num_blocks, block_size, Hkv, D) -> (B, Hq, D), computed in float32.
    gathered: a dict reused across layers to hold the slot indices (computed once per step)."""
    b, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    grp = hq // hkv
    if gathered is None or not gathered:
        gathered = {} if gathered is None else gathered
        for part, tables, lens in (("prefix", meta.prefix_tables, meta.prefix_lens),
                                   ("suffix", meta.suffix_tables, meta.suffix_lens)):
            slots, valid = context_slots(tables, lens, bs)
            gathered[part] = slots, ~valid[:, None, None, :]
    kv = lambda cache, slots: gather_slots(cache, slots).transpose(1, 2).float()  # noqa: E731  (X, Hkv, T, D)
    qf = q.float()
    # shared prefixes: all member queries of a group against the group's blocks, once
    ng, m = meta.members.shape
    qg = torch.cat([qf, qf.new_zeros(1, hq, d)])[meta.members]                     # (NG, M, Hq, D)
    qg = qg.view(ng, m, hkv, grp, d).permute(0, 2, 1, 3, 4).reshape(ng, hkv, m * grp, d)
    slots, invalid = gathered["prefix"]
    o_p, lse_p = _partial(qg, kv(k_cache, slots), kv(v_cache, slots), invalid, scale)
    o_p = o_p.view(ng, hkv, m, grp, d).permute(0, 2, 1, 3, 4).reshape(ng * m, hq, d)
    lse_p = lse_p.view(ng, hkv, m, grp).permute(0, 2, 1, 3).reshape(ng * m, hq)
    o_p = torch.cat([o_p, o_p.new_zeros(1, hq, d)])[meta.row_member]              # (B, Hq, D)
    lse_p = torch.cat([lse_p, lse_p.new_full((1, hq), float("-inf"))])[meta.row_member]
    # each row's own remainder
    slots, invalid = gathered["suffix"]
    o_s, lse_s = _partial(qf.view(b, hkv, grp, d), kv(k_cache, slots), kv(v_cache, slots), invalid, scale)
    o_s, lse_s = o_s.reshape(b, hq, d), lse_s.reshape(b, hq)
    mx = torch.maximum(lse_p, lse_s)
    w_p, w_s = (lse_p - mx).exp(), (lse_s - mx).exp()                              # lse_s is finite
    out = (o_p * w_p[..., None] + o_s * w_s[..., None]) / (w_p + w_s)[..., None]
    return out.to(q.dtype)
