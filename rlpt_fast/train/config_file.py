"""Reading a TrainConfig: TOML tables, `--section.key=value` overrides, type checks, unknown keys.

Values of overrides are parsed as TOML values (`--grpo.beta=0`, `--data.files=['a.jsonl']`),
falling back to a bare string; a bare `--key=value` is accepted when exactly one section has that
key. Every value is checked against its field's type before the section validates itself, and an
unknown section or key is an error that names it and lists the known ones.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from rlpt_fast.train.config import SECTION_TYPES, ConfigError, TrainConfig


def config_from_dict(raw: dict, where: str = "config") -> TrainConfig:
    sections = [f.name for f in dataclasses.fields(TrainConfig)]
    kwargs = {}
    for name, value in raw.items():
        if name not in sections:
            owners = [s for s, kind in SECTION_TYPES.items() if name in {f.name for f in dataclasses.fields(kind)}]
            hint = f"; {name} is a key of [{owners[0]}]: write it under that table" if len(owners) == 1 else ""
            raise ConfigError(f"{where}: unknown section [{name}] (known: {', '.join(sections)}){hint}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, got {value!r}")
        kwargs[name] = _engine(value, where) if name == "engine" else _section(SECTION_TYPES[name], name, value, where)
    return TrainConfig(**kwargs)


# a sample value of each type an [engine] field can have (its annotation's first part)
_SAMPLES = {"int": 0, "float": 0.0, "bool": False, "str": ""}


def _engine(values: dict, where: str) -> dict:
    """The [engine] table with each known key's value checked against EngineConfig's annotation
    (unknown keys are left for TrainConfig, which names them)."""
    from rlpt_fast.rollout.config import EngineConfig

    annotations = {f.name: str(f.type) for f in dataclasses.fields(EngineConfig)}
    out = {}
    for k, v in values.items():
        kinds = annotations.get(k, "").split(" | ")
        sample = _SAMPLES.get(kinds[0], "" if kinds[0].startswith("Literal") else None)
        if sample is None or (v is None and "None" in kinds):
            out[k] = v
            continue
        out[k] = _coerce(f"{where}: engine.{k}", sample, v)
    return out


def _section(kind: type, name: str, values: dict, where: str):
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)} "
                          f"(known in [{name}]: {', '.join(sorted(fields))})")
    defaults = kind()
    annotations = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    typed = {k: _coerce(f"{where}: {name}.{k}", getattr(defaults, k), v, annotations[k]) for k, v in values.items()}
    return kind(**typed)


# list fields: the type of their items, from the field's annotation
_ITEM_DEFAULTS = {"list[str]": "", "list[float]": 0.0, "list[int]": 0}


def _coerce(where: str, default: Any, value: Any, annotation: str = "") -> Any:
    """Check `value` against the type of the field's default (ints are accepted for floats;
    a list's items against its annotation; nan and inf are refused)."""
    if isinstance(default, list) and annotation in _ITEM_DEFAULTS:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list):
            return [_coerce(f"{where}[{i}]", _ITEM_DEFAULTS[annotation], v) for i, v in enumerate(items)]
    if isinstance(default, float) and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if default is None:  # optional bool
        ok = value is None or isinstance(value, bool)
        expected = "true or false"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, list):
        value = [value] if isinstance(value, str) else value
        ok, expected = isinstance(value, list), "a list"
    else:
        ok, expected = isinstance(value, dict), "a table"
    if not ok:
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return value


def parse_override(arg: str) -> tuple[str, Any]:
    """'--section.key=value' -> ('section.key', value); value parsed as a TOML value, else a string."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected --key=value or --section.key=value")
    key, _, text = arg[2:].partition("=")
    key = key.replace("-", "_")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def _resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, _, leaf = key.partition(".")
        return section, leaf
    owners = [s for s, kind in SECTION_TYPES.items() if key in {f.name for f in dataclasses.fields(kind)}]
    if len(owners) != 1:
        why = "is in no section" if not owners else f"is ambiguous (in {', '.join(owners)})"
        raise ConfigError(f"override --{key}: {why}; write --section.{key}=...")
    return owners[0], key


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML file (None: defaults) and apply --key=value overrides. Relative paths in
    model.path, data.files and train.output_dir are taken relative to the TOML file (relative
    paths in overrides, to the working directory)."""
    raw: dict = {}
    where = "overrides"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file: {e}") from None
        _anchor_paths(raw, path.parent)
    for arg in overrides:
        section, leaf = _resolve_key(parse_override(arg)[0])
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: [{section}] must be a table")
        raw[section][leaf] = parse_override(arg)[1]
    return config_from_dict(raw, where)


def _anchor_paths(raw: dict, base: Path) -> None:
    def anchor(p):
        return p if not isinstance(p, str) or not p or Path(p).is_absolute() else str(base / p)
    if isinstance(raw.get("model"), dict) and "path" in raw["model"]:
        raw["model"]["path"] = anchor(raw["model"]["path"])
    if isinstance(raw.get("train"), dict) and "output_dir" in raw["train"]:
        raw["train"]["output_dir"] = anchor(raw["train"]["output_dir"])
    if isinstance(raw.get("data"), dict) and "files" in raw["data"]:
        files = raw["data"]["files"]
        raw["data"]["files"] = [anchor(f) for f in ([files] if isinstance(files, str) else files)]
