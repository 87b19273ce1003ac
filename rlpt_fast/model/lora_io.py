"""LoRA adapters on disk: PEFT's adapter layout in and out, merging, and merged HF checkpoints.

Written by hand (no peft import at run time) so that adapters move between us, peft and
transformers; see lora.py for the naming that makes the keys line up.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, read_json_object
from .loader import CheckpointError, canonical_key  # canonical_key: released key layout -> ours
from .lora import PEFT_PREFIX, LoRAConfig, LoRALinear, apply_lora, lora_layers, set_submodule


def _peft_target_regex(model: nn.Module, cfg: LoRAConfig) -> str:
    """A regex that peft fullmatches against the transformers model's module names, selecting
    exactly the modules we wrapped (peft's list form would also catch the vision tower's MLPs)."""
    if isinstance(cfg.target_modules, str):
        inner = cfg.target_modules
    else:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)})
        inner = r"(?:.*\.)?(?:" + "|".join(map(re.escape, leaves)) + ")"
        if cfg.target_modules is not None and any("." in t for t in cfg.target_modules):
            inner = "|".join(re.escape(n) for n, _ in lora_layers(model))
    return r"^(?!(?:.*\.)?visual\.)(?:" + inner + r")$"


def adapter_state_dict(model: nn.Module, save_embedding_layers: bool | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors under the keys peft writes. save_embedding_layers=None follows peft's
    "auto": when lm_head carries an adapter, peft also stores `lm_head.base_layer.weight`."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
        if name == "lm_head" and save_embedding_layers is not False:
            out[f"{PEFT_PREFIX}{name}.base_layer.weight"] = m.base_layer.weight
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_path: str | Path | None = None,
                 *, save_embedding_layers: bool | None = None) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors as peft's save_pretrained does."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("save_adapter: the model has no LoRA (call apply_lora first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": _peft_target_regex(model, cfg), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(adapter_state_dict(model, save_embedding_layers), str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Loads a peft LoRA adapter directory into `model` (applying LoRA first if it has none)."""
    d = Path(adapter_dir)
    raw = _adapter_config(d / "adapter_config.json")
    if not any(True for _ in lora_layers(model)):
        missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in raw]
        if missing:
            raise ConfigError(f"{d / 'adapter_config.json'}: missing fields {missing} (needed to add LoRA "
                              "to a model that has none)")
        targets = raw["target_modules"]
        apply_lora(model, LoRAConfig(raw["r"], float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)),
                                     targets if isinstance(targets, str) else tuple(targets)))
    tensors = _adapter_tensors(d)
    layers = dict(lora_layers(model))
    loaded = set()
    for key, value in tensors.items():
        name, sep, param = canonical_key(key.removeprefix(PEFT_PREFIX)).rpartition(".lora_")
        if not sep and key.endswith(".base_layer.weight"):  # peft's copy of a frozen head: ours already
            continue
        if name not in layers or param not in ("A.weight", "B.weight"):
            raise ValueError(f"{d}: tensor {key!r} matches no LoRA layer of the model")
        target = getattr(layers[name], "lora_" + param[0]).weight
        if target.shape != value.shape:
            raise ValueError(f"{d}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        loaded.add((name, param[0]))
    missing = [f"{n}.lora_{p}" for n in layers for p in "AB" if (n, p) not in loaded]
    if missing:
        raise ValueError(f"{d}: adapter lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model


def _adapter_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter_config.json in the adapter directory")
    raw = read_json_object(file)
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if raw.get(flag):
            raise ValueError(f"{file}: {flag}=true is not supported")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r}, expected 'LORA'")
    return raw


def _adapter_tensors(d: Path) -> dict[str, torch.Tensor]:
    file = d / "adapter_model.safetensors"
    if not file.is_file():
        if (d / "adapter_model.bin").is_file():
            raise CheckpointError(f"{d / 'adapter_model.bin'}: pickle adapters are refused (unpickling can "
                                  "run code): save the adapter as safetensors")
        raise FileNotFoundError(f"{d}: no adapter_model.safetensors")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


# ---------------------------------------------------------------- merging

def _shared_elsewhere(model: nn.Module, layer: LoRALinear) -> bool:
    w = layer.base_layer.weight
    return sum(p is w for _, p in model.named_parameters(remove_duplicate=False)) > 1


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight and unwraps it (in place). A head tied to the
    embeddings gets its own weight, since the embedding matrix has no adapter."""
    for name, layer in list(lora_layers(model)):
        base, w = layer.base_layer, layer.base_layer.weight
        merged = (w.float() + layer.delta_weight().detach().float()).to(w.dtype)
        if _shared_elsewhere(model, layer):
            base.weight = nn.Parameter(merged, requires_grad=w.requires_grad)
        else:
            with torch.no_grad():
                w.copy_(merged)
        set_submodule(model, name, base)
        if name == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # now really untied: keep tie_weights() off it
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameter names (v5 layout) -> merged weights, without touching the model."""
    out = {k.replace(".base_layer.", "."): v.detach() for k, v in model.state_dict().items()
           if ".lora_A." not in k and ".lora_B." not in k}
    for name, layer in lora_layers(model):
        w = layer.base_layer.weight
        out[f"{name}.weight"] = (w.float() + layer.delta_weight().detach().float()).to(w.dtype)
    return out


def _checkpoint_keys(ckpt: Path) -> list[str]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    keys = []
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    if not keys:
        raise FileNotFoundError(f"{ckpt}: no safetensors weights found")
    return keys


def save_merged(model: nn.Module, base_checkpoint_dir: str | Path, out_dir: str | Path,
                *, max_shard_bytes: int = 5 << 30) -> Path:
    """Writes a full HF checkpoint of the merged model: the base directory's files (config,
    tokenizer, processor) copied, weights under the base checkpoint's own key names. A LoRA head
    on a tied model unties it (lm_head.weight written, tie_word_embeddings set false)."""
    src, out = Path(base_checkpoint_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours = merged_state_dict(model)
    keys = _checkpoint_keys(src)
    untie = "lm_head" in dict(lora_layers(model)) and "lm_head.weight" not in keys
    tensors, seen = {}, set()
    for key in keys + (["lm_head.weight"] if untie else []):
        name = canonical_key(key)
        if name not in ours:
            raise KeyError(f"{src}: checkpoint tensor {key!r} has no counterpart {name!r} in the model")
        t = ours[name].contiguous().cpu()
        # safetensors refuses aliased tensors (a tied head the checkpoint stores twice)
        tensors[key] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    if untie:
        _untie_config(out / "config.json")
    _write_shards(tensors, out, max_shard_bytes)
    return out


def _untie_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2) + "\n")


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
