"""Shared-prefix group packing for the GRPO training forward.

A group is one prompt and its G sampled completions. Packed, it is ONE flat sequence

    [ prompt (P) | c_1[:-1] | c_2[:-1] | ... | c_G[:-1] ]

where every completion attends to the whole prompt and causally to itself, never to its siblings,
and its token j sits at rotary position P + j + delta on all three M-RoPE axes (delta from
model.rope_positions), exactly where it sits in the unpacked sequence [prompt; c_k]. The prompt's
activations (and their gradients) are computed once per group instead of G times.

A completion's last token is only ever a target, so it is not fed: completion token 0 is predicted
by the prompt's last position, token j > 0 by the completion's own position j - 1. Several groups
go into one flat batch; attention never crosses groups.

Mask (q, kv): same sequence, kv <= q, and kv in the prompt or in q's own completion.
Backends, chosen in ONE place (`default_backend`): FlexAttention block masks on CUDA (compiled
kernel); SDPA with a dense boolean mask per sequence elsewhere (FlexAttention has no backward on CPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import AttentionFn


@dataclass
class Group:
    """One prompt and its completions. prompt_ids (P,) int64; completions: G tensors (L_k,), L_k >= 1.
    Images: pixel_values + image_grid_thw (I, 3) as the processor gives them, or image_embeds
    (M, H) already encoded (then image_grid_thw is still needed for the rotary positions)."""
    prompt_ids: torch.Tensor
    completions: list[torch.Tensor]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def __post_init__(self):
        if self.prompt_ids.ndim != 1 or self.prompt_ids.numel() == 0:
            raise ValueError(f"Group.prompt_ids must be a non-empty 1-D tensor, got shape {tuple(self.prompt_ids.shape)}")
        if not self.completions:
            raise ValueError("Group.completions is empty: a group needs at least one completion")
        for k, c in enumerate(self.completions):
            if c.ndim != 1 or c.numel() == 0:
                raise ValueError(f"Group.completions[{k}] must be a non-empty 1-D tensor, got shape {tuple(c.shape)}")
        if (self.pixel_values is not None or self.image_embeds is not None) and self.image_grid_thw is None:
            raise ValueError("Group has images but no image_grid_thw (needed for M-RoPE positions)")


@dataclass
class PackedBatch:
    """Flat packed batch. N packed tokens, C completion tokens (targets), S packed sequences.

    input_ids (N,) int64; positions (3, N) int64; seq_id (N,) int32: packed sequence of each token;
    branch (N,) int32: 0 = prompt, k >= 1 = k-th completion of its sequence; seq_bounds: S (start,
    end) pairs; predict_index (C,) int64: row of the hidden states that predicts each target;
    target_ids (C,) int64: the completion tokens, group by group, completion by completion.
    prompt_copies: for each packed sequence, the index of the group whose prompt (and images) it holds.
    """
    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_id: torch.Tensor
    branch: torch.Tensor
    seq_bounds: list[tuple[int, int]]
    predict_index: torch.Tensor
    target_ids: torch.Tensor
    completion_lengths: list[int]
    prompt_copies: list[int]

    def to(self, device: torch.device | str) -> PackedBatch:
        move = ("input_ids", "positions", "seq_id", "branch", "predict_index", "target_ids")
        return PackedBatch(**{k: (getattr(self, k).to(device) if k in move else getattr(self, k))
                              for k in self.__dataclass_fields__})


def pack_groups(model, groups: list[Group], *, share_prompt: bool = True) -> PackedBatch:
    """Lays the groups out flat. share_prompt=False gives the unpacked baseline with the same
    output layout: every completion in its own sequence [prompt; completion[:-1]]."""
    ids, pos, seq, branch, bounds = [], [], [], [], []
    predict, copies = [], []
    n = 0
    for g, group in enumerate(groups):
        prompt_pos, delta = model.rope_positions(group.prompt_ids.cpu(), _cpu(group.image_grid_thw))
        p = group.prompt_ids.numel()
        members = [list(range(len(group.completions)))] if share_prompt else \
            [[k] for k in range(len(group.completions))]
        for ks in members:
            start = n
            ids.append(group.prompt_ids.cpu())
            pos.append(prompt_pos.cpu())
            branch.append(torch.zeros(p, dtype=torch.int32))
            n += p
            for b, k in enumerate(ks, start=1):
                c = group.completions[k].cpu()
                fed = c.numel() - 1
                ids.append(c[:-1])
                pos.append((p + delta + torch.arange(fed)).expand(3, fed))
                branch.append(torch.full((fed,), b, dtype=torch.int32))
                predict.append(torch.cat([torch.tensor([start + p - 1]), n + torch.arange(fed)]))
                n += fed
            seq.append(torch.full((n - start,), len(bounds), dtype=torch.int32))
            bounds.append((start, n))
            copies.append(g)
    targets = [c.cpu() for group in groups for c in group.completions]
    return PackedBatch(
        input_ids=torch.cat(ids).long(), positions=torch.cat(pos, dim=1).long(),
        seq_id=torch.cat(seq), branch=torch.cat(branch), seq_bounds=bounds,
        predict_index=torch.cat(predict).long(), target_ids=torch.cat(targets).long(),
        completion_lengths=[t.numel() for t in targets], prompt_copies=copies)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def mask_mod(seq_id: torch.Tensor, branch: torch.Tensor):
    """FlexAttention mask_mod(b, h, q, kv) -> bool of the packed layout (also used for dense masks)."""
    def mod(b, h, q, kv):
        same_seq = seq_id[q] == seq_id[kv]
        visible = (branch[kv] == 0) | (branch[kv] == branch[q])
        return same_seq & visible & (kv <= q)
    return mod


def dense_mask(packed: PackedBatch, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Boolean (n, n) mask of packed rows/cols [start, end): True = may attend."""
    end = packed.input_ids.numel() if end is None else end
    idx = torch.arange(start, end, device=packed.seq_id.device)
    return mask_mod(packed.seq_id, packed.branch)(0, 0, idx[:, None], idx[None, :])


def default_backend(device: torch.device | str) -> str:
    """The one place that picks the attention backend: "flex" on CUDA, "sdpa" elsewhere;
    RLPT_PACKED_ATTENTION=flex|sdpa overrides (flex compiles once per process, which a short
    run or a benchmark may not want to pay)."""
    choice = os.environ.get("RLPT_PACKED_ATTENTION")
    if choice:
        if choice not in ("flex", "sdpa"):
            raise ValueError(f"RLPT_PACKED_ATTENTION must be 'flex' or 'sdpa', got {choice!r}")
        return choice
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def packed_attention(packed: PackedBatch, backend: str) -> AttentionFn:
    """AttentionFn(layer_idx, q (N, Hq, D), k (N, Hkv, D), v (N, Hkv, D)) -> (N, Hq, D) for the
    packed layout (GQA by head groups, scale 1/sqrt(D)). backend: "flex" or "sdpa"."""
    if backend == "flex" and packed.input_ids.numel() >= FLEX_MIN_TOKENS:
        return _flex_attention(packed)
    if backend == "flex":
        return _sdpa_attention(packed)
    if backend == "sdpa":
        return _sdpa_attention(packed)
    raise ValueError(f"packed_attention: backend must be 'flex' or 'sdpa', got {backend!r}")


def _sdpa_attention(packed: PackedBatch) -> AttentionFn:
    # Sequences never see each other, so attention is block diagonal: one SDPA call per sequence
    # with its own (n, n) mask, built once and shared by every layer.
    masks = [dense_mask(packed, s, e) for s, e in packed.seq_bounds]

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # KV heads repeated by hand: with a mask, CUDA's memory-efficient kernel does not take
        # enable_gqa, and SDPA would fall back to the math path (scores materialized)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = []
        for (s, e), m in zip(packed.seq_bounds, masks):
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                attn_mask=m)  # (Hq, n, D)
            out.append(o.transpose(0, 1))
        return torch.cat(out)
    return attn


_COMPILED: dict[str, object] = {}
# Under 128 queries inductor lowers FlexAttention to its decoding kernel, which has no training
# (fp32, backward) variant: "NoValidChoicesError" on an H100 with torch 2.11. Such tiny packs
# take SDPA, whose cost there is nothing.
FLEX_MIN_TOKENS = 128


def _flex_fns(device_type: str):
    """(create_block_mask, flex_attention), compiled once per process on CUDA; eager elsewhere
    (tests only: eager flex materializes the scores and has no CPU backward)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device_type != "cuda":
        return create_block_mask, flex_attention
    if not _COMPILED:
        # default dynamism: static for the first shape, symbolic once a second length shows up,
        # so batches of varying length do not recompile each time
        _COMPILED["mask"] = torch.compile(create_block_mask)
        _COMPILED["flex"] = torch.compile(flex_attention)
    return _COMPILED["mask"], _COMPILED["flex"]


def _flex_attention(packed: PackedBatch) -> AttentionFn:
    n = packed.input_ids.numel()
    device = packed.seq_id.device
    make_mask, kernel = _flex_fns(device.type)
    block_mask = make_mask(mask_mod(packed.seq_id, packed.branch), None, None, n, n, device=device)

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = kernel(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                   block_mask=block_mask, enable_gqa=True)  # (1, Hq, N, D)
        return o[0].transpose(0, 1)
    return attn


def pad_completions(flat: torch.Tensor, lengths: list[int], value: float = 0) -> torch.Tensor:
    """(C, ...) in completion order -> (B, Lmax, ...) padded with `value` (differentiable), the
    layout of rlpt_kernels.grpo_loss_from_hidden; B = len(lengths). The mask is
    `pad_completions(torch.ones(C, dtype=torch.bool), lengths, False)`."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(lengths)), batch_first=True, padding_value=value)


def _image_embeds(model, group: Group) -> torch.Tensor | None:
    if group.image_embeds is not None:
        return group.image_embeds
    if group.pixel_values is None:
        return None
    return model.encode_images(group.pixel_values, group.image_grid_thw)


def training_forward(model, groups: list[Group], *, share_prompt: bool = True,
                     backend: str | None = None) -> torch.Tensor:
    """Hidden states (C, H) of the positions that predict each completion token, in the order
    of PackedBatch.target_ids (group, completion, token): logits = model.compute_logits(out), or
    straight into rlpt_kernels.grpo_loss_from_hidden. Decoder layers are checkpointed when
    model.gradient_checkpointing is set. backend: None = default_backend(device)."""
    hidden, _ = packed_forward(model, groups, share_prompt=share_prompt, backend=backend)
    return hidden


def packed_forward(model, groups: list[Group], *, share_prompt: bool = True,
                   backend: str | None = None) -> tuple[torch.Tensor, PackedBatch]:
    """training_forward that also returns the PackedBatch (targets, lengths, layout)."""
    device = model.lm_head.weight.device
    packed = pack_groups(model, groups, share_prompt=share_prompt).to(device)
    per_group = [_image_embeds(model, g) for g in groups]
    images = [per_group[g] for g in packed.prompt_copies if per_group[g] is not None]
    embeds = model.embed(packed.input_ids, torch.cat(images) if images else None)
    attn = packed_attention(packed, backend or default_backend(device))
    hidden = model.forward_hidden(embeds, packed.positions, attn)  # (N, H)
    return hidden[packed.predict_index], packed
