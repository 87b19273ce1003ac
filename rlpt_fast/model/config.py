"""Model configuration parsed from a Hugging Face config.json (Qwen2-VL and Qwen2.5-VL).

Two on-disk layouts exist: the flat one of the released checkpoints (text fields at the top level,
`rope_scaling: {"type": "mrope", "mrope_section": [...]}`, vision fields under `vision_config`),
and transformers 5's nested one (`text_config` with `rope_parameters`). Both parse to the same
dataclasses; anything we do not implement (sliding-window attention, other rope types, other
activations, another architecture) is refused with an error that names the file and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
REQUIRED_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads")


class ConfigError(ValueError):
    """config.json describes something this package does not implement."""


def _require_ints(fields: dict, names: tuple[str, ...], *, minimum: int, prefix: str = "") -> None:
    """Integer fields must be ints (not bools, floats or strings) >= minimum, checked before any
    arithmetic on them turns a wrong type into a TypeError far from the field."""
    for name in names:
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{prefix}{name} must be {kind}, got {value!r}")


@dataclass
class VisionConfig:
    """The vision tower. hidden_size is the tower width (Qwen2-VL calls it embed_dim),
    out_hidden_size the merger output (= the decoder's hidden size)."""

    architecture: str
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    window_size: int = 0  # Qwen2.5-VL only: window side in pixels
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: int = 2

    def __post_init__(self):
        _require_ints(vars(self), ("depth", "hidden_size", "num_heads", "intermediate_size",
                                   "out_hidden_size", "patch_size", "temporal_patch_size",
                                   "spatial_merge_size", "in_channels"), minimum=1, prefix="vision ")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"vision hidden_size {self.hidden_size} must split into {self.num_heads} "
                              "heads whose size is a multiple of 4 (2-D rotary)")
        if self.hidden_act not in ("quick_gelu", "silu", "gelu"):
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported")
        if self.architecture == "qwen2_5_vl":
            unit = self.spatial_merge_size * self.patch_size
            if self.window_size <= 0 or self.window_size % unit:
                raise ConfigError(f"vision window_size {self.window_size} must be a positive multiple "
                                  f"of spatial_merge_size * patch_size = {unit}")
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if bad:
                raise ConfigError(f"vision fullatt_block_indexes {bad} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one row of pixel_values: C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class ModelConfig:
    """The decoder plus token ids. head_dim is hidden_size / num_attention_heads, as Qwen2-VL
    computes it (a `head_dim` field in config.json is ignored by transformers too)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: list[int]
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: list[int]
    vision: VisionConfig
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES.values():
            raise ConfigError(f"architecture {self.architecture!r} is not one of {sorted(ARCHITECTURES.values())}")
        _require_ints(vars(self), REQUIRED_TEXT_FIELDS + ("num_key_value_heads",), minimum=1)
        _require_ints(vars(self), ("image_token_id", "video_token_id", "vision_start_token_id",
                                   "vision_end_token_id"), minimum=0)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(f"mrope_section {self.mrope_section} must be 3 numbers summing to "
                              f"head_dim / 2 = {self.head_dim // 2}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(f"vision output size {self.vision.out_hidden_size} != hidden_size {self.hidden_size}")
        if not self.eos_token_ids:
            raise ConfigError("no eos_token_id")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]


def load_config(path: str | Path) -> ModelConfig:
    """Parse `path/config.json` (and eos ids from `path/generation_config.json` when present)."""
    path = Path(path)
    if not path.is_dir():  # a hub id such as Qwen/Qwen2-VL-2B-Instruct, most likely
        raise FileNotFoundError(f"{path}: not a local directory (a Hugging Face checkpoint directory is "
                                "needed: nothing is downloaded)")
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json in the checkpoint directory")
    raw = read_json_object(file)
    gen_file = path / "generation_config.json"
    extra_eos = read_json_object(gen_file).get("eos_token_id") if gen_file.is_file() else None
    try:
        return parse_config(raw, extra_eos)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # a field of a kind the checks do not foresee (a list where a number belongs, ...)
        raise ConfigError(f"{file}: malformed field ({type(e).__name__}: {e})") from None


def read_json_object(file: Path) -> dict:
    """The JSON object in `file`; ConfigError naming the file if it is not JSON or not an object."""
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: must hold a JSON object, got a {type(raw).__name__}")
    return raw


def _section(raw: dict, key: str) -> dict:
    """raw[key] as a dict ({} when absent or null)."""
    value = raw.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{key} must be a JSON object, got a {type(value).__name__}")
    return value or {}


def _architecture(raw: dict) -> str:
    names = raw.get("architectures") or []
    if not isinstance(names, list):
        raise ConfigError(f"architectures must be a list of class names, got {names!r}")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and raw.get("model_type") in ARCHITECTURES.values():
        return raw["model_type"]
    raise ConfigError(f"unsupported architecture {names or raw.get('model_type')!r}; "
                      f"supported: {sorted(ARCHITECTURES)}")


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, list) else [x])]


def _rope(text: dict) -> tuple[float, list[int]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ConfigError(f"rope type {kind!r} is not supported (only M-RoPE)")
    if "mrope_section" not in rope:
        raise ConfigError("rope_scaling/rope_parameters has no mrope_section")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    return float(theta), [int(s) for s in rope["mrope_section"]]


def _vision(arch: str, v: dict, text_hidden: int) -> VisionConfig:
    common = dict(architecture=arch, depth=v.get("depth", 32), num_heads=v.get("num_heads", 16),
                  patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
                  spatial_merge_size=v.get("spatial_merge_size", 2),
                  in_channels=v.get("in_channels", v.get("in_chans", 3)),
                  rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    if arch == "qwen2_vl":
        width = v.get("embed_dim", 1280)
        return VisionConfig(hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4)),
                            out_hidden_size=v.get("hidden_size", text_hidden),
                            hidden_act=v.get("hidden_act", "quick_gelu"), **common)
    return VisionConfig(hidden_size=v.get("hidden_size", 1280), intermediate_size=v.get("intermediate_size", 3420),
                        out_hidden_size=v.get("out_hidden_size", text_hidden),
                        hidden_act=v.get("hidden_act", "silu"), window_size=v.get("window_size", 112),
                        fullatt_block_indexes=list(v.get("fullatt_block_indexes", [7, 15, 23, 31])),
                        tokens_per_second=v.get("tokens_per_second", 2), **common)


def parse_config(raw: dict, extra_eos=None) -> ModelConfig:
    """ModelConfig from a config.json dict (flat or nested layout)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"must hold a JSON object, got a {type(raw).__name__}")
    arch = _architecture(raw)
    text = dict(_section(raw, "text_config") or raw)
    missing = [k for k in REQUIRED_TEXT_FIELDS if k not in text]
    if missing:
        raise ConfigError(f"missing fields {missing}")
    _require_ints(text, REQUIRED_TEXT_FIELDS, minimum=1)  # before hidden_size sizes the vision config
    if text.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {text['hidden_act']!r} is not supported (SwiGLU with silu only)")
    theta, section = _rope(text)
    heads = text["num_attention_heads"]
    tie = raw.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
    eos = _as_list(text.get("eos_token_id", raw.get("eos_token_id")))
    eos += [e for e in _as_list(extra_eos) if e not in eos]
    return ModelConfig(
        architecture=arch, vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=text.get("num_key_value_heads") or heads,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)), rope_theta=theta, mrope_section=section,
        tie_word_embeddings=bool(tie), image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
        vision_end_token_id=raw.get("vision_end_token_id", 151653), eos_token_ids=eos,
        vision=_vision(arch, _section(raw, "vision_config"), text["hidden_size"]),
        bos_token_id=text.get("bos_token_id", raw.get("bos_token_id")),
        pad_token_id=text.get("pad_token_id", raw.get("pad_token_id")),
    )
