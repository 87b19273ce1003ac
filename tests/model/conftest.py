"""Tiny checkpoints and transformers references shared by the model tests (built once per session)."""
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlpt_fast.testing import write_tiny_checkpoint

ARCHS = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="session", params=ARCHS)
def tiny_ckpt(request, tmp_path_factory) -> Path:
    """Path of a tiny random checkpoint directory, once per architecture."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=0)


@dataclass
class Pair:
    path: Path
    ours: torch.nn.Module
    ref: torch.nn.Module
    proc: object

    def ref_forward(self, **inputs) -> torch.Tensor:
        """transformers' logits, passing only the inputs this transformers version accepts
        (5.x wants mm_token_type_ids beside image_grid_thw; older ones do not know it)."""
        accepted = inspect.signature(self.ref.forward).parameters
        with torch.no_grad():
            return self.ref(**{k: v for k, v in inputs.items() if k in accepted}).logits

    def ref_rope_index(self, input_ids, image_grid_thw, attention_mask=None):
        """transformers' get_rope_index for a (B, T) batch, whatever its signature."""
        fn = self.ref.model.get_rope_index
        kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        if "mm_token_type_ids" in inspect.signature(fn).parameters:
            kwargs["mm_token_type_ids"] = (input_ids == self.ours.config.image_token_id).int()
        return fn(input_ids, **kwargs)


@pytest.fixture(scope="session")
def pair(tiny_ckpt) -> Pair:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rlpt_fast.model import load_model

    ref = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, local_files_only=True, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(tiny_ckpt, local_files_only=True)
    return Pair(tiny_ckpt, load_model(tiny_ckpt), ref, proc)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def image():
    """image(height, width, seed) -> a random RGB PIL image."""
    return random_image
