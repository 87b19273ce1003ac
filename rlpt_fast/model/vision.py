"""Vision towers of Qwen2-VL and Qwen2.5-VL (ViT over 14x14x2 patches, 2-D rotary, 2x2 merger).

Input is the processor's `pixel_values` (P, C*tp*ps*ps): patches of all images concatenated, each
image's patches in merge-block-major order; `image_grid_thw` (I, 3) gives each image's patch grid.
Output is one embedding per merged 2x2 block: (P / 4, out_hidden_size), images in order.

Qwen2-VL: LayerNorm blocks, fc1/act/fc2 MLP, attention over each whole image (each frame).
Qwen2.5-VL: RMSNorm blocks, SwiGLU MLP with bias, and window attention: tokens are permuted so each
window (window_size pixels square, in merged units) is contiguous; blocks listed in
fullatt_block_indexes attend over whole images, the others within windows; the merger output is
permuted back. Parameter names follow the checkpoints (blocks.{i}.attn.qkv, merger.mlp.0, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import segment_attention
from .config import VisionConfig
from .decoder import RMSNorm
from .rope import inv_freq, rotate_half

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "silu": F.silu,
}


class PatchEmbed(nn.Module):
    """Conv3d with stride = kernel, i.e. one matmul per patch; run as F.linear (faster than conv3d
    on GPU), the weight keeps the Conv3d shape of the checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, -1).unbind(1)  # each (N, H, hd)
        # rotary in float32 like transformers' apply_rotary_pos_emb_vision
        q = (q.float() * cos[:, None] + rotate_half(q.float()) * sin[:, None]).to(x.dtype)
        k = (k.float() * cos[:, None] + rotate_half(k.float()) * sin[:, None]).to(x.dtype)
        return self.proj(segment_attention(q, k, v, cu_seqlens).reshape(n, -1))


class GeluMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6) if cfg.architecture == "qwen2_vl" else RMSNorm(dim, 1e-6)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.hidden_size), _norm(cfg, cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.mlp = GeluMLP(cfg) if cfg.architecture == "qwen2_vl" else GatedMLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Norm, then concatenate each 2x2 block of patches and project to the decoder width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = _norm(cfg, cfg.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


def patch_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(P, 2) (row, col) of every patch, in the processor's merge-block-major order."""
    out = []
    for t, h, w in grid_thw:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hw = torch.stack([hh.reshape(shape).transpose(1, 2).flatten(), ww.reshape(shape).transpose(1, 2).flatten()], -1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_index(grid_thw: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Order of merged blocks that makes each window contiguous, and window boundaries in patches.

    window: window side in merged blocks. Windows at the right/bottom edges are partial.
    Returns (index LongTensor (P/merge^2,), cu_seqlens list over patches).
    """
    index, cu, base, unit = [], [0], 0, merge * merge
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for ti in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    block = ids[ti, r:r + window, c:c + window].flatten()
                    index.append(block + base)
                    cu.append(cu[-1] + block.numel() * unit)
        base += t * gh * gw
    return torch.cat(index), cu


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def _rotary(self, grid: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (P, head_dim) float32: first half rows by (row, col) freqs, repeated."""
        pos = patch_positions(grid, self.cfg.spatial_merge_size).to(device)
        freqs = pos[..., None].float() * inv_freq(self.cfg.head_dim // 2, self.cfg.rope_theta, device)
        freqs = freqs.flatten(1)  # (P, hd/2): row freqs then col freqs
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (P, patch_dim), image_grid_thw (I, 3) -> (P / merge^2, out_hidden_size)."""
        cfg = self.cfg
        grid = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
        if pixel_values.shape != (sum(t * h * w for t, h, w in grid), cfg.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} do not match image_grid_thw {grid} "
                             f"(expected ({sum(t * h * w for t, h, w in grid)}, {cfg.patch_dim}))")
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        cos, sin = self._rotary(grid, dev)
        frames = [h * w for t, h, w in grid for _ in range(t)]
        cu_full = torch.tensor([0] + frames, device=dev).cumsum(0)
        if cfg.architecture == "qwen2_vl":
            for blk in self.blocks:
                x = blk(x, cu_full, cos, sin)
            return self.merger(x)
        unit = cfg.spatial_merge_size**2
        order, cu = window_index(grid, cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size)
        order = order.to(dev)
        perm = (order[:, None] * unit + torch.arange(unit, device=dev)).flatten()  # patch order
        x, cos, sin = x[perm], cos[perm], sin[perm]
        cu_window = torch.tensor(cu, device=dev)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in cfg.fullatt_block_indexes else cu_window, cos, sin)
        return self.merger(x)[torch.argsort(order)]
