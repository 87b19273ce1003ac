"""Teacher-forced caption loss over a batch of [prompt; caption] sequences, for the warm start.

The decoder is flat over tokens (rlpt_fast.model); here the sequences are concatenated, each with
its own M-RoPE positions, and attention pads them into one (S, H, Lmax, D) batch so a step is a
single SDPA call per layer instead of one per sequence (on a CPU the per-call overhead of ~16
small calls costs more than the arithmetic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlpt_fast.model import QwenVLModel
from rlpt_fast.model.attention import AttentionFn
from rlpt_fast.prompts import Prompt


def padded_causal_attention(cu_seqlens: torch.Tensor) -> AttentionFn:
    """Causal attention within each sequence of a flat batch; cu_seqlens (S+1,) int64.

    Returns AttentionFn(layer, q (N, Hq, D), k/v (N, Hkv, D)) -> (N, Hq, D), exactly the dense
    per-sequence causal attention (padded keys masked, padded query rows dropped).
    """
    bounds = cu_seqlens.long()
    lens = bounds[1:] - bounds[:-1]
    lmax = int(lens.max())
    offs = torch.arange(lmax)
    valid = offs[None, :] < lens[:, None]  # (S, Lmax)
    idx = (bounds[:-1, None] + offs[None, :]).clamp(max=int(bounds[-1]) - 1)
    causal = offs[None, :] <= offs[:, None]  # (Lmax q, Lmax kv)
    mask = (causal[None] & valid[:, None, :])[:, None]  # (S, 1, Lmax, Lmax)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rep = q.shape[1] // k.shape[1]
        qb = q[idx].transpose(1, 2)  # (S, Hq, Lmax, D)
        kb, vb = (t[idx].repeat_interleave(rep, dim=2).transpose(1, 2) for t in (k, v))
        # plain matmuls: on a CPU they beat SDPA's masked flash kernel at these sizes
        scores = qb @ kb.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias.to(q.dtype)
        out = scores.softmax(-1) @ vb
        return out.transpose(1, 2)[valid]  # (N, Hq, D)
    return attn


def caption_loss(model: QwenVLModel, prompts: list[Prompt], captions: list[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy (float32 scalar) of every caption token given its prompt.

    prompts: model inputs (input_ids (P_i,), pixel_values, image_grid_thw); captions: (L_i,)
    int64 target ids, end-of-turn token included. Sequence i is [prompt_i; caption_i[:-1]]; its
    hidden row P_i - 1 + j predicts caption token j.
    """
    ids, pos, images, rows, starts = [], [], [], [], [0]
    for p, c in zip(prompts, captions):
        seq = torch.cat([p.input_ids, c[:-1]])
        positions, _ = model.rope_positions(seq, p.image_grid_thw)
        ids.append(seq)
        pos.append(positions)
        if p.pixel_values is not None:
            images.append(model.encode_images(p.pixel_values, p.image_grid_thw))
        rows.append(starts[-1] + p.input_ids.numel() - 1 + torch.arange(c.numel()))
        starts.append(starts[-1] + seq.numel())
    flat = torch.cat(ids)
    embeds = model.embed(flat, torch.cat(images) if images else None)
    hidden = model.forward_hidden(embeds, torch.cat(pos, dim=1),
                                  padded_causal_attention(torch.tensor(starts)))
    logits = model.compute_logits(hidden[torch.cat(rows)]).float()
    return F.cross_entropy(logits, torch.cat(captions))
