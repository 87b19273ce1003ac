"""The demo's GRPO phase: RePIC's name rewards through `rlpt_fast.train.Trainer`.

Training rows are written in RePIC's row format (references first, query last; solution the
concept key(s); `yes_no_name` for one concept, `yes_no_name_multi` for several) and read back by
the recipe's loader, so the trainer sees exactly what a user's RePIC data would give it.

One deliberate difference from RePIC's run: prompts are rendered in RePIC's *inference* layout
(system prompt, each reference image followed by its "i. Name: ..., Info: ..." line, the query
image, a question from the cycling list), the layout the demo's tiny base model was warm-started
and is evaluated in. RePIC trains a 7B model in its training layout (images first) and relies on
it transferring; a 100K-parameter model does not transfer between layouts. The trainer's
`data.prompt_layout = "inference"` renders each row that way from the row alone (its reference
lines and images; see rlpt_fast/prompt_layout.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlpt_fast.data import load_rows
from rlpt_fast.synthetic import ref_path, scene_path
from rlpt_fast.train.config import (DataSection, GRPOSection, LoRASection, ModelSection, OptimSection,
                                    TrainConfig, TrainSection)

from .world import DemoWorld, scene_keys


@dataclass
class RLConfig:
    """GRPO settings of the demo (RePIC's: G = 8, beta 0.04 with k3, eps 0.2, "grpo" loss,
    temperature 1, RePIC-exact rewards). LoRA on every Linear outside the vision tower, as RePIC,
    at a rank and learning rate suited to a 100K-parameter model.

    Where they differ from RePIC, it is for the non-name words (evidence in TUNING.md): a reward
    on names alone lets them drift, so the KL term is far stronger (beta 0.6; 1.0 and 1.5 cost
    F1); G = 16 kept more of them than 8; 8 prompts per step let 30 steps see every training
    row; lr 7.5e-4 is the rate at which GRPO alone lost nothing on four near-perfect bases."""
    steps: int = 30
    prompts_per_step: int = 8
    num_generations: int = 16
    beta: float = 0.6
    lr: float = 7.5e-4
    lora_r: int = 8
    lora_alpha: float = 16.0
    max_new_tokens: int = 64

    def __post_init__(self):
        for k in ("steps", "prompts_per_step", "lora_r", "max_new_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"RLConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.num_generations < 2:
            raise ValueError(f"RLConfig.num_generations must be >= 2, got {self.num_generations}")
        if self.beta < 0 or not self.lr > 0:
            raise ValueError(f"RLConfig needs beta >= 0 and lr > 0, got {self.beta}, {self.lr}")


def rl_rows(dw: DemoWorld) -> list[dict]:
    """One RePIC row per training scene: all its concepts as references (database order)."""
    rows = []
    for sc in dw.train_scenes:
        keys = scene_keys(dw.world, sc)
        concepts = [dw.world.concept(k) for k in keys]
        lines = [f"{i}. Name: <{c.name}>, Info: {c.info}" for i, c in enumerate(concepts, start=1)]
        multi = len(keys) > 1
        rows.append({"image": [ref_path(c) for c in concepts] + [scene_path(sc)],
                     "problem": "\n".join(lines + ["Give a personalized caption of the last image."]),
                     "solution": keys if multi else keys[0],
                     "accu_reward_method": "yes_no_name_multi" if multi else "yes_no_name"})
    return rows


def write_rl_rows(dw: DemoWorld) -> Path:
    path = dw.files.root / "rl_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rl_rows(dw)))
    return path


def train_config(base: Path, rows: Path, out: Path, cfg: RLConfig, seed: int) -> TrainConfig:
    return TrainConfig(
        model=ModelSection(path=str(base), dtype="float32", device="auto", gradient_checkpointing=False),
        lora=LoRASection(enabled=True, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0),
        data=DataSection(files=[str(rows)], prompt_layout="inference"),
        grpo=GRPOSection(num_generations=cfg.num_generations, beta=cfg.beta, kl="k3",
                         max_new_tokens=cfg.max_new_tokens, temperature=1.0, reward_compat="repic"),
        optim=OptimSection(lr=cfg.lr, schedule="constant", warmup_steps=0),
        train=TrainSection(prompts_per_step=cfg.prompts_per_step, max_steps=cfg.steps, seed=seed,
                           output_dir=str(out), progress=False, plots=True, tensorboard=False),
        engine={"max_model_len": 1024})


def build_trainer(dw: DemoWorld, base: Path, out: Path, cfg: RLConfig, seed: int):
    """A Trainer on the demo's rows and base model, prompts in the inference layout."""
    from rlpt_fast.train import Trainer

    rows_file = write_rl_rows(dw)
    rows = load_rows(rows_file).rows
    return Trainer(train_config(base, rows_file, out, cfg, seed), rows=rows)
