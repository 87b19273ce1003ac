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


# Weights in torch.save's pickle format, as older transformers wrote them: named, never opened.
PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.pt", "*.pth")


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
        return _index_shards(index)
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
    if pickles:
        raise CheckpointError(f"{path}: only pickle weights ({_few(pickles)}); pickle checkpoints "
                              "are refused (unpickling can run code): convert them to safetensors")
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def _index_shards(index: Path) -> list[Path]:
    """The shard files model.safetensors.index.json lists, each checked to exist beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
    if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
        raise CheckpointError(f"{index}: weight_map must be an object mapping tensor names to "
                              "shard file names")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index} lists shard {name!r}: shards must be plain file names "
                                  f"inside {index.parent}")
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{index} lists shard {name}, which is missing from {index.parent}")
    return [index.parent / name for name in names]


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               image_cache_size: int = 4096) -> QwenVLModel:
    """QwenVLModel from a checkpoint directory, weights in `dtype` on `device`, in eval mode.

    Raises ConfigError (bad or unsupported config.json), FileNotFoundError (no weights) or
    CheckpointError naming the tensor or file (missing / unexpected / twice-stored tensor, wrong
    shape or non-float dtype, corrupt or unreadable safetensors file, pickle weights only).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"load_model: dtype must be a floating-point torch.dtype, got {dtype!r}")
    path = Path(path)
    config = load_config(path)
    with torch.device("meta"):
        model = QwenVLModel(config, image_cache_size=image_cache_size)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the tied head its own storage; share it again
    targets = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, str] = {}  # our name -> "file: key" it was read from
    for file in weight_files(path):
        _load_file(file, targets, config.tie_word_embeddings, device, filled)
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(targets) - set(filled) - skip)
    if missing:
        hint = ("; tie_word_embeddings is false in config.json, so the head is not the embedding"
                if "lm_head.weight" in missing else "")
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {_few(missing)}{hint}")
    return model.eval()


def _load_file(file: Path, targets: dict[str, torch.nn.Parameter], tied: bool, device,
               filled: dict[str, str]) -> None:
    """Copies file's tensors into targets, recording each in `filled`."""
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = canonical_key(key)
                if tied and name == "lm_head.weight":
                    continue  # some tied checkpoints also store the head; the embedding is the truth
                if name not in targets:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} (not in the model)")
                if name in filled:  # e.g. model.norm.weight beside model.language_model.norm.weight
                    raise CheckpointError(f"{file}: tensor {key!r} is stored twice "
                                          f"(also as {filled[name]})")
                _check_tensor(file, key, f.get_slice(key), targets[name])
                with torch.no_grad():
                    targets[name].copy_(f.get_tensor(key))
                filled[name] = f"{file.name}: {key!r}"
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def _check_tensor(file: Path, key: str, stored, param: torch.nn.Parameter) -> None:
    """Shape and dtype from the file's header, before any data is read."""
    shape = tuple(stored.get_shape())
    if shape != tuple(param.shape):
        raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}, "
                              f"the model expects {tuple(param.shape)}")
    dtype = stored.get_dtype()  # safetensors' names: F32, BF16, F8_E4M3, I64, U8, BOOL, ...
    if not dtype.startswith(("F", "BF")):  # copy_ would silently cast integers into weights
        raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}, "
                              "the model expects floating point")


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")
