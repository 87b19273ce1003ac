"""Qwen2-VL / Qwen2.5-VL image preprocessing, our own, equal to transformers' processors.

    image (H, W) RGB
      -> smart_resize: both sides multiples of factor = patch_size * merge_size (28), pixel count
         within [min_pixels, max_pixels], aspect ratio kept as far as rounding allows
      -> resize (bicubic), rescale by 1/255, normalize with the CLIP mean / std
      -> patchify: (grid_h * grid_w, 3 * temporal_patch_size * 14 * 14) float32, rows ordered by
         2x2 merge blocks (block row, block col, row in block, col in block), each 14x14 patch
         repeated temporal_patch_size times (a still image is a 2-frame video)
      -> image_grid_thw = (1, grid_h, grid_w); the LLM sees grid_h * grid_w / merge_size**2
         <|image_pad|> tokens for it.

backend="pil" matches `Qwen2VLImageProcessorPil` bit for bit (PIL bicubic on uint8, the same
float32 arithmetic); backend="torch" matches the torchvision-based `Qwen2VLImageProcessor`
(antialiased bicubic interpolation in float32, rounded back to uint8, fused rescale+normalize).
tests/recipe/test_image_processing.py compares both against transformers.

`repic_resize` is the extra resize RePIC's trainer applies before the processor.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("pil", "torch")


@dataclass(frozen=True)
class VisionConfig:
    """Preprocessing settings (transformers' defaults; `from_pretrained` reads a checkpoint's)."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    backend: str = "pil"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"VisionConfig.backend must be one of {BACKENDS}, "
                             f"got {self.backend!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"VisionConfig needs 0 < min_pixels <= max_pixels, got "
                             f"{self.min_pixels}, {self.max_pixels}")
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            raise ValueError("VisionConfig patch_size, temporal_patch_size and merge_size "
                             "must be >= 1")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "VisionConfig":
        """Read preprocessor_config.json of a checkpoint directory (absent file: defaults)."""
        f = Path(path) / "preprocessor_config.json"
        try:
            cfg = json.loads(f.read_text()) if f.is_file() else {}
            size = cfg.get("size") or {}
            kw = {
                "min_pixels": cfg.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
                "max_pixels": cfg.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
            }
            for k in ("patch_size", "temporal_patch_size", "merge_size"):
                if k in cfg:
                    kw[k] = int(cfg[k])
            for k in ("image_mean", "image_std"):
                if k in cfg:
                    kw[k] = tuple(float(v) for v in cfg[k])
            kw.update(overrides)
            return cls(**kw)
        except (OSError, ValueError, TypeError, AttributeError) as e:  # torn JSON, a field of the wrong type
            raise ValueError(f"{f}: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class ProcessedImage:
    """pixel_values: (grid_h * grid_w, 3 * t * p * p) float32. grid_thw: (1, grid_h, grid_w).
    scale: (sx, sy) model-input pixels per original pixel (x_input = x_original * sx).
    original_size / input_size: (width, height) before any resize / as the model sees it."""
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    scale: tuple[float, float]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    num_tokens: int


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) with both multiples of `factor` and pixels in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def repic_resize(image: Image.Image, multi_image: bool) -> Image.Image:
    """RePIC's pre-processor resize: with several images (multi_image) any side over 512 brings
    the short side to 512; a lone image is brought to short side 1024 if a side exceeds 1024.
    Their arithmetic, kept: int() truncation, and a short side below the limit is enlarged."""
    limit = 512 if multi_image else 1024
    w, h = image.size
    if w <= limit and h <= limit:
        return image
    if w < h:
        new = (limit, int(h * (limit / w)))
    else:
        new = (int(w * (limit / h)), limit)
    return image.resize(new, Image.Resampling.LANCZOS)


def _resize_pil(image: Image.Image, h: int, w: int) -> np.ndarray:
    """(3, h, w) uint8, PIL bicubic as Qwen2VLImageProcessorPil does it."""
    out = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def _normalize_pil(x: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    # transformers: rescale in float64 then cast, then (x - mean) / std in float32.
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(cfg.image_mean, dtype=np.float32)
    std = np.array(cfg.image_std, dtype=np.float32)
    return ((x.T - mean) / std).T


def _resize_normalize_torch(image: Image.Image, h: int, w: int, cfg: VisionConfig) -> torch.Tensor:
    """(3, h, w) float32 as the torchvision-backed Qwen2VLImageProcessor computes it on CPU."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    if x.shape[-2:] != (h, w):
        # torchvision resizes uint8 natively on CPU for bicubic (no float round trip).
        x = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bicubic",
                                            align_corners=False, antialias=True)[0]
    # Fused rescale + normalize: (x - mean * 255) / (std * 255), constants in float32.
    mean = torch.tensor(cfg.image_mean) * (1.0 / (1 / 255))
    std = torch.tensor(cfg.image_std) * (1.0 / (1 / 255))
    return (x.float() - mean[:, None, None]) / std[:, None, None]


def patchify(x: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """(C, H, W) -> (grid_h * grid_w, C * t * p * p) in merge-block order."""
    c, h, w = x.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # (..., C, t, p, p)
    return x.reshape(gh * gw, c * t * p * p)


def preprocess(image: Image.Image, cfg: VisionConfig = VisionConfig(), *,
               original_size: tuple[int, int] | None = None) -> ProcessedImage:
    """Preprocess one RGB image. original_size: (w, h) the scale refers to, when `image` was
    already resized (e.g. by repic_resize) from a larger original; default image.size."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w0, h0 = original_size or image.size
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if cfg.backend == "pil":
        x = torch.from_numpy(_normalize_pil(_resize_pil(image, h, w), cfg))
    else:
        x = _resize_normalize_torch(image, h, w, cfg)
    pv = patchify(x.contiguous(), cfg).contiguous()
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    return ProcessedImage(pv, (1, gh, gw), (w / w0, h / h0), (w0, h0), (w, h),
                          gh * gw // cfg.merge_size ** 2)


def num_image_tokens(width: int, height: int, cfg: VisionConfig = VisionConfig()) -> int:
    """<|image_pad|> tokens an image of this size becomes (after any repic_resize)."""
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return (h // cfg.patch_size) * (w // cfg.patch_size) // cfg.merge_size ** 2
