"""Cascade decode attention in torch: the backend on CPUs and the reference of the Triton version.

Same math as cascade_attention.py (each row's context = its group's shared prefix + its own
suffix, two partial softmaxes merged by their maxima), shaped for a CPU, where a decode step of a
small model is dominated by the number of ops, not by bytes:
- the group's prefix K/V and each row's suffix K/V are gathered from the paged cache ONCE per
  grouping (the grouping lives until a block table changes), as dense float32 copies: K stored
  transposed (X, Hkv, D, T) so both matmuls of a partial read contiguous rows;
- a step only writes its new token into the suffix copies (a slice when every row's newest token
  sits at the same column, as after a fork), then runs two matmul-softmax-matmul partials;
- partials stay unnormalized (out, max, sum) and are merged once:
      m = max(m_p, m_s),  out = (o_p e^(m_p-m) + o_s e^(m_s-m)) / (l_p e^(m_p-m) + l_s e^(m_s-m));
- when the groups are the batch's rows in order (a fork lays them out that way), the suffix copies
  are kept in the groups' layout (G, Hkv, M, ...), so prefix and suffix partials line up as they
  come out of the matmuls and only the result is transposed back to rows; otherwise the suffix is
  kept per row (G = B, M = 1) and the prefix partials are indexed into rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpt_fast.rollout.decode_attention import context_slots, gather_slots


@dataclass
class _Step:
    """Per step, shared by the layers: the suffix layout (G, M): row r sits at slot (r // M, r % M);
    the suffix columns attended (width); the key mask of slots whose suffix is shorter (bias
    (G * Hkv * M, 1, width) 0/-inf, None when all are equal); where the step's new token goes
    (column, or per-row slot and position when the rows differ)."""
    layout: tuple[int, int]
    width: int
    bias: torch.Tensor | None
    column: int | None
    slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _layout(meta) -> tuple[int, int]:
    return tuple(meta.members.shape) if meta.in_order else (len(meta.suffix_lens_host), 1)


def _plan(meta, hkv: int, device) -> _Step:
    lens, layout = meta.suffix_lens_host, _layout(meta)
    width = max(lens)
    if min(lens) == width:
        return _Step(layout, width, None, width - 1)
    g, m = layout
    grid = meta.suffix_lens.view(g, 1, m).expand(g, hkv, m).reshape(-1)
    rows = torch.arange(len(lens), device=device)
    return _Step(layout, width, _bias(grid, width, device), None, (rows // m, rows % m, meta.suffix_lens - 1))


def _bias(lens: torch.Tensor, width: int, device) -> torch.Tensor:
    """(X, 1, width) float: 0 for the first lens[x] columns, -inf after."""
    cols = torch.arange(width, device=device)
    return torch.zeros(lens.shape[0], width, device=device).masked_fill_(cols >= lens[:, None], float("-inf"))[:, None]


def _dense(cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, transpose: bool) -> torch.Tensor:
    """float32 copies of the tokens of each table: (X, Hkv, D, T) if transpose else (X, Hkv, T, D)."""
    slots, _ = context_slots(tables, lens, cache.shape[1])
    kv = gather_slots(cache, slots)                                                 # (X, T, Hkv, D)
    return (kv.permute(0, 2, 3, 1) if transpose else kv.transpose(1, 2)).float().contiguous()


def _prefix_bias(meta, hkv: int, device) -> torch.Tensor | None:
    """(NG * Hkv, 1, Tp) 0/-inf over each group's padded prefix; None when all prefixes are as long."""
    width = meta.prefix_tables.shape[1] * meta.block_size
    if min(meta.prefix_lens_host) == width:
        return None
    return _bias(meta.prefix_lens.repeat_interleave(hkv), width, device)


def _layer_kv(meta, k_cache, v_cache, layer, new_kv, step: _Step):
    """(kp_t, vp, prefix bias), (ks_t, vs) of one layer: kept in meta.prefix_kv across the steps of
    the grouping when layer and new_kv are given (the suffix extended by new_kv), else gathered for
    this call. A gather already holds this step's token (stored before attention); its columns past
    a row's length hold copies of the row's first token (finite, masked by the bias; never unwritten
    cache rows, which may hold NaN) until later steps write them."""
    keep = layer is not None and new_kv is not None
    prefix = meta.prefix_kv.get(("prefix", layer)) if keep else None
    if prefix is None:
        prefix = (_dense(k_cache, meta.prefix_tables, meta.prefix_lens, True),
                  _dense(v_cache, meta.prefix_tables, meta.prefix_lens, False),
                  _prefix_bias(meta, k_cache.shape[2], k_cache.device))
        if keep:
            meta.prefix_kv[("prefix", layer)] = prefix
    suffix = meta.prefix_kv.get(("suffix", layer)) if keep else None
    g, m = step.layout
    if suffix is None:
        to_slots = lambda x: x.view(g, m, *x.shape[1:]).transpose(1, 2).contiguous()  # (G, Hkv, M, ...)
        suffix = (to_slots(_dense(k_cache, meta.suffix_tables, meta.suffix_lens, True)),
                  to_slots(_dense(v_cache, meta.suffix_tables, meta.suffix_lens, False)), step.layout)
        if keep:
            meta.prefix_kv[("suffix", layer)] = suffix
        return prefix, suffix
    ks_t, vs, _ = suffix
    k, v = (x.view(g, m, *x.shape[1:]).transpose(1, 2) for x in new_kv)            # (G, Hkv, M, D)
    if step.column is not None:
        ks_t[..., step.column].copy_(k)
        vs[..., step.column, :].copy_(v)
    else:
        gi, mi, pos = step.slots
        ks_t[gi, :, mi, :, pos] = new_kv[0].float()
        vs[gi, :, mi, pos] = new_kv[1].float()
    return prefix, suffix


def carry_dense_kv(old, new) -> None:
    """Moves old's kept dense copies into new, a grouping of the SAME rows after their block tables
    changed (a row entered a new block): a group's prefix copy holds if its prefix blocks are the
    same; a row's suffix copy holds if its suffix starts at the same token and its old suffix
    blocks lead its new ones (columns past its tokens are zeros or stale, masked, until written)."""
    (old_p, old_s), (new_p, new_s) = old.tables_host, new.tables_host
    same_prefix = old_p == new_p
    same_suffix = old.suffix_start == new.suffix_start and all(n[:len(o)] == o for o, n in zip(old_s, new_s))
    width = new.suffix_tables.shape[1] * new.block_size
    for key, value in old.prefix_kv.items():
        if key[0] == "prefix" and same_prefix:
            new.prefix_kv[key] = value
        elif key[0] == "suffix" and same_suffix and value[2] == _layout(new):
            ks_t, vs, layout = value
            if ks_t.shape[-1] < width:  # grown geometrically: a copy every few blocks, not every block
                cap = max(width, 2 * ks_t.shape[-1])
                grown_k = ks_t.new_zeros(*ks_t.shape[:-1], cap)
                grown_k[..., :ks_t.shape[-1]] = ks_t
                grown_v = vs.new_zeros(*vs.shape[:-2], cap, vs.shape[-1])
                grown_v[..., :vs.shape[-2], :] = vs
                ks_t, vs = grown_k, grown_v
            new.prefix_kv[key] = ks_t, vs, layout


def _partial(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             floor: torch.Tensor | None = None):
    """q (X, Q, D) scaled, k_t (X, D, T), v (X, T, D), bias (X, 1, T) or None: one batch of
    (group or row, KV head) matrices -> unnormalized (out (X, Q, D), max (X, Q, 1), sum (X, Q, 1)).
    floor (X, Q, 1): the max is raised to it (the merge's common stabilizer). One exp pass; an
    additive bias, not masked_fill: the broadcast add is several times faster on the CPU."""
    s = torch.bmm(q, k_t)
    if bias is not None:
        s.add_(bias)
    m = s.amax(-1, keepdim=True)
    if floor is not None:
        m = torch.maximum(m, floor)
    p = s.sub_(m).exp_()
    return torch.bmm(p, v), m, p.sum(-1, keepdim=True)


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta,
                             scale: float, gathered: dict | None = None, layer: int | None = None,
                             new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q (B, Hq, D); caches (num_blocks, block_size, Hkv, D); meta: a CascadeMeta -> (B, Hq, D) in
    q's dtype, computed in float32. gathered: a dict shared by the layers of one step (holds the
    step's plan); layer and new_kv (this step's k, v (B, Hkv, D), already in the cache): keep the
    dense K/V copies in meta.prefix_kv across the steps of one grouping and extend them by new_kv."""
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    grp = hq // hkv
    if gathered is None or "plan" not in gathered:
        gathered = {} if gathered is None else gathered
        gathered["plan"] = _plan(meta, hkv, q.device)
    step = gathered["plan"]
    (kp_t, vp, pbias), (ks_t, vs, _) = _layer_kv(meta, k_cache, v_cache, layer, new_kv, step)
    qs = q.float() * scale
    ng, m = meta.members.shape
    g, gm = step.layout
    x, tp, w = g * hkv * gm, kp_t.shape[-1], step.width
    # shared prefixes: all member queries of a group (M members x grp heads) against its blocks, once
    rows = qs if meta.in_order else torch.cat([qs, qs.new_zeros(1, hq, d)])[meta.members]
    qg = rows.view(ng, m, hkv, grp, d).transpose(1, 2).reshape(ng * hkv, m * grp, d)
    o_p, m_p, l_p = _partial(qg, kp_t.view(-1, d, tp), vp.view(-1, tp, d), pbias)
    if meta.in_order:  # the suffix slots are the groups' layout: the partials line up as they are
        qx, o_p, m_p, l_p = qg.view(x, grp, d), o_p.view(x, grp, d), m_p.view(x, grp, 1), l_p.view(x, grp, 1)
    else:  # back to batch rows; rows of no group get an empty prefix (max -inf, sum 0)
        part = torch.cat([o_p, m_p, l_p], -1).view(ng, hkv, m, grp, d + 2).transpose(1, 2).reshape(ng * m, hq, d + 2)
        empty = part.new_zeros(1, hq, d + 2)
        empty[..., d] = float("-inf")
        part = torch.cat([part, empty])[meta.row_member].view(x, grp, d + 2)
        qx, o_p, m_p, l_p = qs.view(x, grp, d), part[..., :d], part[..., d:d + 1], part[..., d + 1:]
    # each slot's own remainder (>= 1 token, so its max is finite), exponentiated against the
    # larger of both maxima: then only the prefix part needs rescaling
    o_s, mx, l_s = _partial(qx, ks_t[..., :w].view(x, d, w), vs[..., :w, :].view(x, w, d), step.bias, m_p)
    a = (m_p - mx).exp_()
    out = torch.addcmul(o_s, o_p, a).div_(torch.addcmul(l_s, l_p, a))                # (G*Hkv*M, grp, D)
    return out.view(g, hkv, gm, grp, d).transpose(1, 2).reshape(b, hq, d).to(q.dtype)
