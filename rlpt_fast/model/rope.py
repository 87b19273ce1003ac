"""Multimodal rotary positions (M-RoPE) of Qwen2-VL / Qwen2.5-VL.

Every token has three position ids (temporal, height, width). Text tokens use the same running
index on all three axes. An image of merged grid (t, h', w') occupies t*h'*w' tokens whose ids are
(start + t_i, start + h_i, start + w_i); the text after it resumes at start + max(h', w'). So a
sequence with images has fewer distinct positions than tokens, and decoding continues from
`T + delta` with delta = max(position) + 1 - T (transformers' `mrope_position_deltas`).

The rotary itself splits the head_dim/2 frequencies into `mrope_section` = [s_t, s_h, s_w] chunks;
chunk i rotates by the position on axis i.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def rope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *, image_token_id: int,
                   spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids of ONE sequence, as transformers' get_rope_index computes them.

    input_ids: LongTensor (T,). image_grid_thw: LongTensor (I, 3) in patches (before merging), one
    row per image in order of appearance; each image is a run of t*h*w/merge**2 image tokens.
    Returns (positions LongTensor (3, T) on input_ids' device, delta int).
    """
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids must be 1-D (one sequence), got shape {tuple(input_ids.shape)}")
    total = input_ids.numel()
    image_at = torch.nonzero(input_ids == image_token_id).flatten().tolist()
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    pieces, cursor, pos, used = [], 0, 0, 0
    for i, (t, h, w) in enumerate(grids):
        if min(t, h, w) < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"image {i} has grid {t}x{h}x{w}: t, h, w must be >= 1 and h, w multiples "
                             f"of spatial_merge_size {spatial_merge_size}")
        gt, gh, gw = t, h // spatial_merge_size, w // spatial_merge_size
        n = gt * gh * gw
        if used >= len(image_at):
            raise ValueError(f"image_grid_thw has {len(grids)} images but the image tokens run out at image {i}")
        start = image_at[used]
        if image_at[used:used + n] != list(range(start, start + n)):
            raise ValueError(f"image {i} (grid {t}x{h}x{w}) needs {n} consecutive image tokens from index {start}")
        pieces.append(torch.arange(start - cursor).expand(3, -1) + pos)  # text before the image
        pos += start - cursor
        tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, n) + pos)
        pos += max(gh, gw)
        cursor, used = start + n, used + n
    if used != len(image_at):
        raise ValueError(f"{len(image_at)} image tokens but image_grid_thw accounts for {used}")
    pieces.append(torch.arange(total - cursor).expand(3, -1) + pos)
    positions = torch.cat(pieces, dim=1)
    delta = int(positions.max()) + 1 - total if total else 0
    return positions.to(input_ids.device), delta


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,) float32, as transformers' default rope."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


@lru_cache(maxsize=64)
def _inv_freq_cached(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    # a decode step of a small model is a few hundred tiny ops: these four need not be among them.
    # A normal tensor even when first asked for under inference mode (the engine's decode steps):
    # training forwards use it too.
    with torch.inference_mode(False):
        return inv_freq(head_dim, theta, device)


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (N, head_dim) in `dtype` for positions LongTensor (3, N).

    Computed in float32 then cast, as transformers does (so bf16 runs round the same way).
    Positions expanded from one row (stride 0 over the axes, as decode passes them) take the
    1-D rope directly: every section would pick the same values.
    """
    inv = _inv_freq_cached(head_dim, theta, positions.device)
    if positions.stride(0) == 0:
        freqs = positions[0, :, None].float() * inv                                  # (N, D/2)
    else:
        freqs = positions[..., None].float() * inv                                   # (3, N, D/2)
        chunks = freqs.split(mrope_section, dim=-1)
        freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # (N, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (N, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, D) from mrope_cos_sin -> (cos (N, 1, D), signed sin (N, 1, D)) for
    apply_rotary_tables: rotate_half(x) * sin == x.roll(D/2) * [-sin_lo, sin_hi], exactly (a sign
    flip and a data move), in 2 ops per call instead of 5. Made once per forward, used per layer."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D) rotated by cos/sin (N, D), in x's dtype."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def apply_rotary_tables(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary with rotary_tables' (N, 1, D) tensors; the same values, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
