"""LoRA for the Qwen-VL decoder, in PEFT's naming so adapters move between us, peft and transformers.

A wrapped Linear computes  y = base(x) + scaling * B(A(dropout(x))),  scaling = alpha / r,
with A (r, in) Kaiming-uniform and B (out, r) zero at init, as peft does. Module attributes are
peft's (`base_layer`, `lora_A`, `lora_B`), so our module `model.language_model.layers.0.mlp.up_proj`
saves as `base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight`, the key peft
0.21 writes for the transformers model. No peft import at run time: the layout is written by hand.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .loader import canonical_key  # released (transformers-4) key layout -> ours

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    """r, alpha, dropout as in peft. target_modules: None = every nn.Linear outside the vision tower
    (lm_head included, RECIPE.md); a tuple of leaf names (`"q_proj"`) or full module names; or a
    regex string matched (re.fullmatch) against full module names. The vision tower is never wrapped.
    dtype: of the adapter parameters (see the comment on the field)."""
    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str | None = None
    # Adapter parameters are kept in float32 (as peft's autocast_adapter_dtype does) so small AdamW
    # updates are not rounded away in bf16; they are cast to the activations' dtype to compute.
    # None = the base weight's dtype.
    dtype: torch.dtype | None = torch.float32

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"LoRAConfig.dtype must be a floating torch.dtype or None, got {self.dtype!r}")
        if isinstance(self.target_modules, str):
            re.compile(self.target_modules)  # fail now, not at apply time
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"LoRAConfig.target_modules must be non-empty names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def targets(self, name: str) -> bool:
        """Whether the Linear module at full name `name` gets an adapter."""
        if _in_vision(name):
            return False
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)


def _in_vision(name: str) -> bool:
    return "visual" in name.split(".")


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank adapter. `disabled` turns the adapter off (reference policy)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float,
                 dtype: torch.dtype | None = None):
        super().__init__()
        w = base_layer.weight
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype or w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype or w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.disabled = False
        self.train(base_layer.training)  # wrapping an eval-mode model must not switch dropout on

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (out, in); the adapter is NOT in it (see effective_weight)."""
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape (out, in), differentiable w.r.t. A and B."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w if self.disabled else w + self.delta_weight().to(w.dtype)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * dropout(x) @ A.T  (..., r), in x's dtype (A cast to it: cheap, r x in)."""
        return F.linear(self.lora_dropout(x), self.lora_A.weight.to(x.dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        return y + F.linear(self.low_rank(x), self.lora_B.weight.to(x.dtype))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freezes every parameter of `model` and wraps the targeted Linears; returns their names.
    The config is kept as `model.lora_config` for save_adapter."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("apply_lora: the model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and cfg.targets(n)]
    if not names:
        raise ValueError(f"apply_lora: target_modules={cfg.target_modules!r} matched no nn.Linear")
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout, cfg.dtype))
    model.lora_config = cfg
    return names


@contextmanager
def adapter_disabled(model: nn.Module):
    """Within the block the model is the base model exactly (reference log-probs; no weight copy)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.disabled = was


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The (V, H) weight that lm_head applies: W + scaling * B @ A with LoRA (differentiable w.r.t. A
    and B), W without. For rlpt_kernels.grpo_loss_from_hidden(hidden, weight, ...). Ignores the
    adapter's dropout; use lm_head_operands for exactness when dropout is on in training."""
    head = model.lm_head
    return head.effective_weight() if isinstance(head, LoRALinear) else head.weight


def lm_head_operands(model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden', weight') with hidden' @ weight'.T == lm_head(hidden) exactly, dropout included:
    hidden' = [hidden, scaling * dropout(hidden) @ A.T]  (N, H + r),  weight' = [W, B]  (V, H + r).
    Costs one (V, H + r) concat instead of materializing W + B @ A."""
    head = model.lm_head
    if not isinstance(head, LoRALinear) or head.disabled:
        return hidden, head.weight
    b, w = head.lora_B.weight, head.base_layer.weight
    return torch.cat([hidden, head.low_rank(hidden)], dim=-1), torch.cat([w, b.to(w.dtype)], dim=-1)


# ---------------------------------------------------------------- adapter files (peft layout)

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
    raw = json.loads((d / "adapter_config.json").read_text())
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if raw.get(flag):
            raise ValueError(f"{d / 'adapter_config.json'}: {flag}=true is not supported")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{d / 'adapter_config.json'}: peft_type {raw.get('peft_type')!r}, expected 'LORA'")
    if not any(True for _ in lora_layers(model)):
        targets = raw["target_modules"]
        apply_lora(model, LoRAConfig(raw["r"], float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)),
                                     targets if isinstance(targets, str) else tuple(targets)))
    tensors = load_file(str(d / "adapter_model.safetensors"))
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
        _set_submodule(model, name, base)
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
