"""Load a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint directory into QwenVLModel.

Reads config.json and safetensors only (one model.safetensors, or shards listed by
model.safetensors.index.json). Nothing is downloaded and no file from the directory is executed.
The module is built on the meta device and then materialised once with `to_empty` at the target
dtype/device; each tensor is then read from the (memory-mapped) file and copied straight into its
parameter, so at most one checkpoint tensor is alive beside the model.

Checkpoint keys come in two layouts, both accepted:
    released: model.layers.*, model.embed_tokens.*, model.norm.*, visual.*, lm_head.*
    transformers 5: model.language_model.*, model.visual.*, lm_head.*
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import load_config
from .model import QwenVLModel


class CheckpointError(ValueError):
    """The weights on disk do not match the model config.json describes."""


def canonical_key(key: str) -> str:
    """Map a released-layout key to the transformers-5 layout (= our module tree)."""
    for old, new in (("model.layers.", "model.language_model.layers."),
                     ("model.embed_tokens.", "model.language_model.embed_tokens."),
                     ("model.norm.", "model.language_model.norm."),
                     ("visual.", "model.visual.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (a single file or an index's shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard {f.name}, which is missing from {path}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               image_cache_size: int = 4096) -> QwenVLModel:
    """QwenVLModel from a checkpoint directory, weights in `dtype` on `device`, in eval mode.

    Raises ConfigError (bad or unsupported config.json), FileNotFoundError (no weights) or
    CheckpointError naming the tensor or file (missing / unexpected tensor, wrong shape, corrupt
    or unreadable safetensors file).
    """
    path = Path(path)
    config = load_config(path)
    with torch.device("meta"):
        model = QwenVLModel(config, image_cache_size=image_cache_size)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the tied head its own storage; share it again
    targets = dict(model.named_parameters(remove_duplicate=False))
    filled = set()
    for file in weight_files(path):
        filled |= _load_file(file, targets, config.tie_word_embeddings, device)
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(targets) - filled - skip)
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {_few(missing)}")
    return model.eval()


def _load_file(file: Path, targets: dict[str, torch.nn.Parameter], tied: bool, device) -> set[str]:
    filled = set()
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = canonical_key(key)
                if tied and name == "lm_head.weight":
                    continue  # some tied checkpoints also store the head; the embedding is the truth
                if name not in targets:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} (not in the model)")
                param = targets[name]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(param.shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, "
                                          f"the model expects {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(f.get_tensor(key))
                filled.add(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    return filled


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")
