"""QwenVLModel: the whole Qwen2-VL / Qwen2.5-VL model with flat (batch-free) entry points.

Module tree (mirrors transformers 5, so checkpoint and PEFT keys line up):
    model.visual            vision tower + merger (frozen by default)
    model.language_model    embed_tokens, layers[i].{self_attn, mlp, norms}, norm
    lm_head                 tied to embed_tokens when config.tie_word_embeddings

A batch is a concatenation of sequences; who attends to whom is the attention function's business
(see attention.py). Typical use for one sequence:
    pos, delta = m.rope_positions(ids, grid)
    h = m.forward_hidden(m.embed(ids, m.encode_images(px, grid)), pos, causal_attention(cu))
    logits = m.compute_logits(h)
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .attention import AttentionFn, causal_attention
from .config import ModelConfig
from .costs import ModelCosts
from .decoder import TextModel
from .rope import rope_positions
from .vision import VisionTower


class _Inner(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.visual = VisionTower(cfg.vision)
        self.language_model = TextModel(cfg)


class QwenVLModel(ModelCosts, nn.Module):
    """See the module docstring. `image_cache_size` bounds the per-image embedding cache (LRU)."""

    def __init__(self, config: ModelConfig, image_cache_size: int = 4096):
        super().__init__()
        self.config = config
        self.model = _Inner(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.model.visual.requires_grad_(False)
        self.gradient_checkpointing = False
        self.image_cache_size = image_cache_size
        self._image_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._key_memo = WeakIdKeyDictionary()  # pixel tensor -> (version, grid, keys): _image_keys

    def tie_weights(self) -> None:
        """Share lm_head.weight with embed_tokens.weight when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # ---- inputs ---------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (N,) -> (N, H); image-token rows replaced in order by image_embeds (M, H)."""
        x = self.model.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        count = int(is_image.sum())
        given = 0 if image_embeds is None else image_embeds.shape[0]
        if count != given:
            raise ValueError(f"input_ids hold {count} image tokens but image_embeds has {given} rows")
        if count:
            x = x.masked_scatter(is_image[:, None], image_embeds.to(x.dtype))
        return x

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (P, patch_dim), image_grid_thw (I, 3) -> (P / merge^2, H) in model dtype.

        With a frozen tower (the default) this runs under no_grad and each distinct image (by a
        hash of its pixels and grid) is encoded once until clear_image_cache(). Pass pixels on the
        host: they are hashed there and only unseen images are moved to the model's device (pixels
        already on a GPU are copied back to be hashed: ~19 MB of float32 per 1,000-token image).
        """
        sizes = self._check_images(pixel_values, image_grid_thw)
        visual = self.model.visual
        if any(p.requires_grad for p in visual.parameters()):
            return visual(pixel_values.to(self.device), image_grid_thw)
        parts = pixel_values.split(sizes)
        keys = [k + (str(self.dtype),) for k in self._image_keys(pixel_values, parts, image_grid_thw.tolist())]
        new = [k for k in dict.fromkeys(keys) if k not in self._image_cache]
        if new:
            idx = [keys.index(k) for k in new]
            with torch.no_grad():
                out = visual(torch.cat([parts[i] for i in idx]).to(self.device), image_grid_thw[idx])
            merge = self.config.vision.spatial_merge_size ** 2
            self._image_cache.update(zip(new, out.split([sizes[i] // merge for i in idx])))
        for k in keys:
            self._image_cache.move_to_end(k)
        result = torch.cat([self._image_cache[k] for k in keys])
        while len(self._image_cache) > self.image_cache_size:
            self._image_cache.popitem(last=False)
        return result

    def _image_keys(self, pixel_values: torch.Tensor, parts: tuple[torch.Tensor, ...],
                    grid: list[list[int]]) -> list[tuple]:
        """The content keys of pixel_values' images, memoized per tensor object: in a GRPO step the
        trainer and then the engine encode the same prompt tensors, and hashing runs at ~1 GB/s
        (a RePIC step's 8 prompts hold ~200 MB of float32 patches). The memo holds the tensor
        weakly, with its version counter, so a freed or modified tensor is hashed again."""
        if pixel_values.is_inference():  # no version counter to tell a modified tensor by
            return [_image_key(p, g) for p, g in zip(parts, grid)]
        memo = self._key_memo.get(pixel_values)
        if memo is not None and memo[0] == pixel_values._version and memo[1] == grid:
            return memo[2]
        keys = [_image_key(p, g) for p, g in zip(parts, grid)]
        self._key_memo[pixel_values] = (pixel_values._version, grid, keys)
        return keys

    def _check_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None) -> list[int]:
        """Patches per image; a ValueError here rather than a shape error deep in the tower."""
        if image_grid_thw is None:
            raise ValueError("pixel_values without image_grid_thw (one (t, h, w) row per image)")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (I, 3), got shape {tuple(image_grid_thw.shape)}")
        patch_dim = self.config.vision.patch_dim
        if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(f"pixel_values must be (P, {patch_dim}) (C * temporal_patch * patch^2), "
                             f"got shape {tuple(pixel_values.shape)}")
        sizes = image_grid_thw.prod(-1).tolist()
        if sum(sizes) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, image_grid_thw needs {sum(sizes)}")
        return sizes

    def clear_image_cache(self) -> None:
        self._image_cache.clear()

    def rope_positions(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None):
        """(positions LongTensor (3, T), delta int) of one sequence; see rope.rope_positions."""
        return rope_positions(input_ids, image_grid_thw, image_token_id=self.config.image_token_id,
                              spatial_merge_size=self.config.vision.spatial_merge_size)

    # ---- decoder --------------------------------------------------------------------------------
    def forward_hidden(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionFn) -> torch.Tensor:
        """embeds (N, H), positions (3, N), attn -> final-normed hidden states (N, H)."""
        return self.model.language_model.forward_hidden(embeds, positions, attn, self.gradient_checkpointing)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> logits (N, V), hidden's dtype."""
        return self.lm_head(hidden)

    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
               image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """One sequence, dense causal attention: (T, V), logits[t] predicts token t+1."""
        input_ids = input_ids.to(self.device)
        image_embeds = None if pixel_values is None else self.encode_images(pixel_values, image_grid_thw)
        positions, _ = self.rope_positions(input_ids, image_grid_thw)
        cu = torch.tensor([0, input_ids.numel()])
        hidden = self.forward_hidden(self.embed(input_ids, image_embeds), positions, causal_attention(cu))
        return self.compute_logits(hidden)


def _image_key(pixels: torch.Tensor, grid: list[int]) -> tuple:
    """Content hash of one image's patches (bytes of the tensor), plus grid and dtype.

    SHA-256 over the tensor's own buffer (no bytes copy): CPUs with SHA extensions hash about twice
    as fast as blake2b, and an image of 1,000 merged tokens is ~15 MB of float32 patches."""
    data = pixels.detach().contiguous().cpu()
    digest = hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()[:32]
    return digest, tuple(grid), str(pixels.dtype)
