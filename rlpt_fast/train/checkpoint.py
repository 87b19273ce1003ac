"""Checkpoints: written atomically, safetensors + JSON only (never pickle), for exact resume.

Layout of `<output_dir>/checkpoints/step-00000012/`:
    adapter/                   LoRA adapter in PEFT's layout (adapter_config.json,
                               adapter_model.safetensors); loads with peft.PeftModel
    model/                     full fine-tuning: the whole model, a Hugging Face directory
    merged/                    optional (train.save_merged): adapter folded in, a HF directory
    trainer_state.safetensors  optimizer moments per parameter name, torch (and CUDA) RNG states
    trainer_state.json         step, update count, data position, non-finite streak, optimizer
                               hyperparameters, python and numpy RNG states, the run's config
Everything is written into `.tmp-step-...` first and renamed into place, so a directory named
`step-*` is always complete; a crash leaves at most a `.tmp-*` that the next resume deletes (a
step saved again is swapped in by renames too). A checkpoint that cannot be resumed from (a file
missing, torn or corrupt) raises CheckpointError naming it, checked before any model loads.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlpt_fast.model.lora_io import load_adapter, save_adapter, save_merged

FORMAT = 1
_STEP_DIR = re.compile(r"step-\d{8,}")
_META_KEYS = ("step", "updates", "nonfinite_streak", "stream", "rng", "optimizer")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:08d}"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory and the file."""


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """`step-NNNNNNNN` directories by step (a copy such as `step-00000012.bak` is not one)."""
    root = checkpoint_root(output_dir)
    done = [p for p in root.glob("step-*") if _STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(done, key=lambda p: int(p.name[len("step-"):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def remove_partial(output_dir: str | Path) -> None:
    """Delete what an interrupted save left behind."""
    root = checkpoint_root(output_dir)
    for p in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


@dataclass
class TrainerState:
    """What besides weights and optimizer moments a resume needs."""
    step: int = 0               # completed trainer steps (generation batches)
    updates: int = 0            # optimizer updates done (mu per step); the schedule's clock
    nonfinite_streak: int = 0   # consecutive skipped steps


def _rng_json() -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def _restore_rng(rng: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, keys, gauss = rng["python"]
    random.setstate((v, tuple(keys), gauss))
    name, keys, pos, has_gauss, g = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _optimizer_payload(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """(tensors, json) of the optimizer, keyed by parameter name instead of position."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{names[idx]}/{key}"] = t.detach().contiguous().cpu()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "param_names": names}


def save_checkpoint(output_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    param_names: list[str], state: TrainerState, stream_state: dict, config: dict,
                    base_model_path: str, lora: bool, merged: bool) -> Path:
    """Writes the checkpoint of `state.step` atomically; returns its directory."""
    final = step_dir(output_dir, state.step)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora:
        save_adapter(model, tmp / "adapter", base_model_path)
    else:
        save_merged(model, base_model_path, tmp / "model")
    if merged and lora:
        save_merged(model, base_model_path, tmp / "merged")
    tensors, optim_json = _optimizer_payload(optimizer, param_names)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i:03d}"] = s
    save_file(tensors, str(tmp / "trainer_state.safetensors"), metadata={"format": "pt"})
    meta = {"format": FORMAT, "step": state.step, "updates": state.updates,
            "nonfinite_streak": state.nonfinite_streak, "stream": stream_state,
            "optimizer": optim_json, "rng": _rng_json(), "config": config}
    (tmp / "trainer_state.json").write_text(json.dumps(meta))
    _fsync_tree(tmp)
    replace_dir(tmp, final)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`. A `final` already there (the same step saved again,
    after a resume) is first renamed aside to a `.tmp-` name, never deleted in place: a crash
    mid-delete would leave a half-empty `step-*` that resume takes for complete."""
    old = None
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def load_checkpoint(ckpt: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    param_names: list[str], lora: bool) -> tuple[TrainerState, dict]:
    """Restores weights (LoRA adapter; full weights are loaded by the caller from ckpt/model),
    optimizer state and RNG states. Returns (state, stream state). Call it last: it sets the RNG."""
    ckpt = Path(ckpt)
    meta = check_checkpoint(ckpt, lora=lora)
    if lora:
        _loading(ckpt / "adapter", lambda: load_adapter(model, ckpt / "adapter"))
    tensors = _loading(ckpt / "trainer_state.safetensors", lambda: load_file(str(ckpt / "trainer_state.safetensors")))
    if "rng/torch" not in tensors:
        raise CheckpointError(f"{ckpt / 'trainer_state.safetensors'}: no 'rng/torch' tensor{_elsewhere(ckpt)}")
    saved = meta["optimizer"]["param_names"]
    if saved != param_names:
        extra, missing = sorted(set(saved) - set(param_names)), sorted(set(param_names) - set(saved))
        raise CheckpointError(f"{ckpt}: trainable parameters differ from the checkpoint's "
                         f"(only in checkpoint: {extra[:3]}, only in model: {missing[:3]})")
    params = [p for g in optimizer.param_groups for p in g["params"]]  # param_names' order (build_optimizer)
    state = {}
    for i, name in enumerate(param_names):
        prefix = f"optim/{name}/"
        entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for key, v in entry.items():  # torch would take a wrong shape here and fail at the next step
            if v.dim() > 0 and v.shape != params[i].shape:
                raise CheckpointError(f"{ckpt / 'trainer_state.safetensors'}: optim/{name}/{key} has shape "
                                      f"{tuple(v.shape)}, the parameter {tuple(params[i].shape)}{_elsewhere(ckpt)}")
        if entry:
            state[i] = entry
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    _restore_rng(meta["rng"], tensors)
    return TrainerState(meta["step"], meta["updates"], meta["nonfinite_streak"]), meta["stream"]


def check_checkpoint(ckpt: Path, *, lora: bool) -> dict:
    """trainer_state.json of `ckpt` after checking that the files a resume reads are there;
    CheckpointError naming the directory and file otherwise (cheap: run it before loading models)."""
    f = ckpt / "trainer_state.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e}){_elsewhere(ckpt)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{f}: format {got!r}, expected {FORMAT}{_elsewhere(ckpt)}")
    missing = [k for k in _META_KEYS if k not in meta and not (k == "optimizer" and "sharded_state" in meta)]
    if missing:
        raise CheckpointError(f"{f}: missing {missing}{_elsewhere(ckpt)}")
    sharded = "sharded_state" in meta  # torchrun's layout (rlpt_fast.distributed.checkpointing)
    needed = ([] if sharded else ["trainer_state.safetensors"]) + (
        ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"] if lora else ["model/config.json"])
    absent = [n for n in needed if not (ckpt / n).is_file()]
    if absent:
        kind = "LoRA" if lora else "full fine-tuning"
        raise CheckpointError(f"{ckpt}: no {', '.join(absent)} (this run is {kind}: lora.enabled="
                              f"{str(lora).lower()}){_elsewhere(ckpt)}")
    return meta


def _elsewhere(ckpt: Path) -> str:
    """The way out of a bad checkpoint: the one before it, if there is one."""
    done = complete_checkpoints(ckpt.parent.parent)
    earlier = done[:done.index(ckpt)] if ckpt in done else []
    where = f"resume from {earlier[-1].name}" if earlier else "start afresh"
    return f"; if it is damaged, move {ckpt} away to {where}"


def _loading(path: Path, load):
    """load(), with a failure (a corrupt or truncated file) turned into CheckpointError naming `path`."""
    try:
        return load()
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot load it ({type(e).__name__}: {e}){_elsewhere(path.parent)}") from e
