"""What a caller hands the engine and what it gets back.

`Request` is one prompt (token ids, optional images); `SamplingParams` says how to sample its
`n` completions; `Completion` is one of them. These are plain data: no tensors are created here.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class SamplingParams:
    """How to sample the completions of one request.

    temperature 0 is greedy decoding (then top_k/top_p are ignored). top_k 0 and top_p 1.0 turn
    those filters off. seed None draws a seed from torch's global generator at `generate` time,
    so `torch.manual_seed` makes an unseeded run reproducible too. The draws are keyed on (seed,
    sample index, token position) alone: two requests with the same seed and prompt draw the same
    completions, so give each request its own seed (seed in [0, 2**64)). ignore_eos keeps decoding
    through the model's end-of-sequence tokens (benchmarks); stop_token_ids always stop.
    """
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(_token_ids("SamplingParams.stop_token_ids", self.stop_token_ids))
        for name in ("n", "top_k", "max_tokens"):
            if not isinstance(getattr(self, name), numbers.Integral):
                raise ValueError(f"SamplingParams.{name} must be an integer, got {getattr(self, name)!r}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not self.temperature >= 0:  # (not >=: NaN is refused too)
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not (isinstance(self.seed, numbers.Integral) and 0 <= self.seed < 2**64):
            # the sampler keys its random stream on the seed as an unsigned 64-bit integer
            raise ValueError(f"SamplingParams.seed must be in [0, 2**64) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Request:
    """One prompt.

    input_ids: token ids (list of int or a 1-D integer tensor) with the image placeholder tokens
        already expanded (one per merged patch), as the processor writes them.
    pixel_values: (P, C*temporal_patch*patch*patch) patches of all images, in order, or None.
    image_grid_thw: LongTensor (I, 3), the (t, h, w) patch grid of each image, or None.
    """
    input_ids: Sequence[int] | torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.input_ids, torch.Tensor) and self.input_ids.dim() != 1:
            raise ValueError(f"Request.input_ids must be 1-D, got shape {tuple(self.input_ids.shape)}")
        self.input_ids = _token_ids("Request.input_ids", self.input_ids)
        if not self.input_ids:
            raise ValueError("Request.input_ids is empty: a prompt needs at least one token")
        if self.pixel_values is not None and self.pixel_values.dim() != 2:
            raise ValueError(f"Request.pixel_values must be (P, patch_dim), "
                             f"got shape {tuple(self.pixel_values.shape)}")
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("Request.pixel_values and Request.image_grid_thw must be given together")
        if self.image_grid_thw is not None:
            if self.image_grid_thw.dim() != 2 or self.image_grid_thw.shape[1] != 3:
                raise ValueError(f"Request.image_grid_thw must be (I, 3), got {tuple(self.image_grid_thw.shape)}")
            if not _integer_dtype(self.image_grid_thw):
                raise ValueError(f"Request.image_grid_thw must hold integers, got {self.image_grid_thw.dtype}")
            patches = int(self.image_grid_thw.prod(-1).sum())
            if patches != self.pixel_values.shape[0]:
                raise ValueError(f"Request.pixel_values has {self.pixel_values.shape[0]} rows but "
                                 f"image_grid_thw describes {patches} patches")


@dataclass
class Completion:
    """One sampled continuation.

    token_ids: the generated tokens; a stop token (EOS or one of stop_token_ids) that ended the
        completion is included, since the policy chose it and training must score it.
    logprobs: float, one per token: the log-probability of the token under the distribution it was
        sampled from (logits / temperature, after top-k and top-p, renormalized). For greedy
        decoding it is the model's plain log-softmax (temperature 1, no filtering).
    finish_reason: "stop" (a stop token) or "length" (max_tokens or the engine's max_model_len).
    """
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] = "length"


def _integer_dtype(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _token_ids(name: str, ids) -> list[int]:
    """ids (an iterable or a tensor) as a list of non-negative Python ints (a float, even 2.0, is
    refused: it is a caller's bug, and the embedding would fail far from it)."""
    if isinstance(ids, torch.Tensor):
        if not _integer_dtype(ids):
            raise ValueError(f"{name} must hold integers, got {ids.dtype}")
        ids = ids.flatten().tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a sequence of token ids, got {ids!r}")
    ids = list(ids)
    for i, t in enumerate(ids):
        if not isinstance(t, numbers.Integral):
            raise ValueError(f"{name} must hold integers, got {t!r} at index {i}")
        if t < 0:
            raise ValueError(f"{name} must be >= 0, got {t} at index {i}")
    return [int(t) for t in ids]
