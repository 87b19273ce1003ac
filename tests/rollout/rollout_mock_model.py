"""A small model that implements only the model contract (/work/coord/model_contract.md), so the
engine's dependence on the contract, and nothing else, is tested.

One attention layer with a rotary on all three M-RoPE axes, GQA (4 query heads, 2 KV heads),
an MLP, a head. Images: each image of grid (t, h, w) is t*h*w/4 placeholder tokens whose
embeddings are a linear map of its pooled patches; its tokens share ONE position (so the delta
is negative, as with real M-RoPE grids) and the text after it resumes at that position + 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MockConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_hidden_layers: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 8
    image_token_id: int = 60
    eos_token_ids: list[int] = field(default_factory=lambda: [63])
    patch_dim: int = 6


class _Text(nn.Module):
    def __init__(self, cfg: MockConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class _Inner(nn.Module):
    def __init__(self, cfg: MockConfig):
        super().__init__()
        self.language_model = _Text(cfg)


class MockModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = cfg = MockConfig()
        h, d = cfg.hidden_size, cfg.head_dim
        self.model = _Inner(cfg)
        self.qkv = nn.Linear(h, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d)
        self.o = nn.Linear(cfg.num_attention_heads * d, h)
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h))
        self.vision = nn.Linear(cfg.patch_dim, h)
        self.lm_head = nn.Linear(h, cfg.vocab_size)
        with torch.no_grad():  # never sample the placeholder: dense logits() would take it for an image
            self.lm_head.bias[cfg.image_token_id] = -30.0

    def embed(self, input_ids, image_embeds=None):
        x = self.model.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        if int(is_image.sum()) != (0 if image_embeds is None else image_embeds.shape[0]):
            raise ValueError("image token count does not match image_embeds")
        return x if image_embeds is None else x.masked_scatter(is_image[:, None], image_embeds)

    def encode_images(self, pixel_values, image_grid_thw):
        rows = pixel_values.view(-1, 4, self.config.patch_dim).mean(1)  # 4 patches per token
        return self.vision(rows)

    def rope_positions(self, input_ids, image_grid_thw=None):
        pos, out, prev_image = -1, [], False
        for t in input_ids.tolist():
            is_image = t == self.config.image_token_id
            if not (is_image and prev_image):
                pos += 1
            out.append(pos)
            prev_image = is_image
        positions = torch.tensor(out).expand(3, -1)
        return positions, pos + 1 - input_ids.numel()

    def forward_hidden(self, embeds, positions, attn):
        cfg, n = self.config, embeds.shape[0]
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self.qkv(embeds).split([hq * d, hkv * d, hkv * d], dim=-1)
        angle = positions.float().mean(0)[:, None] / 10.0 ** torch.arange(d // 2)     # (N, d/2)
        cos, sin = angle.cos().repeat(1, 2)[:, None], angle.sin().repeat(1, 2)[:, None]
        rot = lambda x: x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin  # noqa: E731
        out = attn(0, rot(q.view(n, hq, d)), rot(k.view(n, hkv, d)), v.view(n, hkv, d))
        x = embeds + self.o(out.reshape(n, hq * d))
        return x + self.mlp(x)

    def compute_logits(self, hidden):
        return self.lm_head(hidden)

    def logits(self, input_ids, pixel_values=None, image_grid_thw=None):
        embeds = self.embed(input_ids, None if pixel_values is None else self.encode_images(pixel_values, image_grid_thw))
        positions, _ = self.rope_positions(input_ids, image_grid_thw)

        def causal(layer, q, k, v):
            o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               is_causal=True, enable_gqa=True)
            return o.transpose(0, 1)

        return self.compute_logits(self.forward_hidden(embeds, positions, causal))
