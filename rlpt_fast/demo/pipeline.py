"""`rlpt demo` end to end: world -> tiny base model + warm start -> score -> GRPO -> score -> report.

Everything is built here from a seed: no download, no file outside `out_dir`. On a CPU it uses
the torch reference kernels (2 threads by default); on a GPU the same code takes the fast paths
(the trainer and engine pick their backends by device).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base_model import BaseModelConfig, build_base_model
from .evaluate import evaluate
from .report import reward_curve, summary, write_report
from .rl import RLConfig, build_trainer
from .world import build_world


@dataclass
class DemoConfig:
    """out_dir: where the world, checkpoints, caption files and report go. threads: torch CPU
    threads. n_concepts / n_scenes: the world's cast and scene count; eval_fraction of the scenes
    (the last ones) are held out. pretrain_scenes: further scenes of the cast that only the
    warm start sees (DemoWorld.pretrain_scenes).

    960 scenes with 80% held out give 655 held-out queries at seed 0 and the same 192 training
    scenes as 240 with 20% (scenes are drawn in sequence). Without pretraining scenes the warm
    start half memorized the 171 training scenes and GRPO's named captions inherited its errors,
    whatever the GRPO settings; with 800 the base generalizes (TUNING.md)."""
    out_dir: Path = Path("rlpt-demo")
    seed: int = 0
    threads: int = 2
    n_concepts: int = 8
    n_scenes: int = 960
    eval_fraction: float = 0.8
    pretrain_scenes: int = 800
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if self.threads < 1:
            raise ValueError(f"DemoConfig.threads must be >= 1, got {self.threads}")
        if self.n_scenes < 10:
            raise ValueError(f"DemoConfig.n_scenes must be >= 10, got {self.n_scenes}")
        if self.pretrain_scenes < 0:
            raise ValueError(f"DemoConfig.pretrain_scenes must be >= 0, got {self.pretrain_scenes}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"DemoConfig.eval_fraction must be in (0, 1), got {self.eval_fraction}")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Runs the demo and returns the summary dict (also written into the report)."""
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    out = cfg.out_dir
    dw = build_world(out / "world", cfg.seed, cfg.n_concepts, cfg.n_scenes, cfg.eval_fraction,
                     cfg.pretrain_scenes)
    log(f"world: {len(dw.world.concepts)} concepts, {len(dw.train_scenes)} training scenes "
        f"(+{len(dw.pretrain_scenes)} for the warm start), {len(dw.queries)} held-out queries "
        f"({time.time() - t0:.0f}s)")
    base, losses = build_base_model(out / "model", dw, cfg.base, cfg.seed, log)
    trainer = build_trainer(dw, base, out / "grpo", cfg.rl, cfg.seed)
    builder = trainer.builder
    before = evaluate(trainer.model, builder, dw, out / "captions_before.json",
                      cfg.rl.max_new_tokens, trainer.engine)  # adapter at zero = the base model
    log(f"before GRPO: P/R/F1 {before.precision:.1f}/{before.recall:.1f}/{before.f1:.1f} "
        f"({time.time() - t0:.0f}s)")
    t_rl = time.time()
    run = trainer.train()
    rl_seconds = time.time() - t_rl
    after = evaluate(trainer.model, builder, dw, out / "captions_after.json",
                     cfg.rl.max_new_tokens, trainer.engine)
    log(f"after GRPO:  P/R/F1 {after.precision:.1f}/{after.recall:.1f}/{after.f1:.1f} "
        f"({time.time() - t0:.0f}s)")
    curve = reward_curve(Path(run["metrics"]), out / "reward_curve.png")
    plots = ([curve] if curve else []) + [Path(p) for p in run["plots"]]
    setup = _setup_lines(cfg, dw, trainer, losses, rl_seconds)
    report_path = out / "report.md"
    result = summary(before, after, steps=run["steps"], seconds=time.time() - t0, report=report_path,
                     extra={"metrics": run["metrics"], "checkpoint": run["checkpoint"],
                            "plots": [str(p) for p in plots], "seed": cfg.seed,
                            "device": str(trainer.device)})
    write_report(report_path, result, before, after, setup, plots)
    return result


def _setup_lines(cfg: DemoConfig, dw, trainer, losses: list[float], rl_seconds: float) -> list[str]:
    m = trainer.model.config
    n_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    b, r = cfg.base, cfg.rl
    ema = f", weights averaged (EMA {b.ema})" if b.ema else ""
    return [
        f"World (seed {cfg.seed}): one user's cast of {len(dw.world.concepts)} named concepts "
        f"({', '.join(dw.names)}); {len(dw.train_scenes)} training scenes, {len(dw.queries)} held-out "
        f"queries; references inserted as RePIC's skip-retrieval lays them out.",
        f"Base model: Qwen2.5-VL architecture, hidden {m.hidden_size}, {m.num_hidden_layers} layers, "
        f"vocabulary {m.vocab_size}, {n_params / 1e3:.0f}K parameters, random vision tower (frozen).",
        f"Warm start: {b.steps} steps x {b.batch} captions of the training scenes and "
        f"{len(dw.pretrain_scenes)} more scenes of the cast (not held out, not RL rows), lr {b.lr}{ema}; "
        f"{100 * b.personal_rate:.0f}% of "
        f"captions name the concepts, the rest are generic; final loss {losses[-1]:.3f}.",
        f"GRPO: {r.steps} steps x {r.prompts_per_step} prompts x G={r.num_generations}, beta {r.beta} "
        f"(k3), LoRA r={r.lora_r} alpha={r.lora_alpha} on every decoder Linear and lm_head, lr {r.lr} "
        f"(constant), temperature 1, {r.max_new_tokens} new tokens max; {rl_seconds:.0f}s.",
        "Rewards: RePIC's, exactly (`reward_compat=repic`): `yes_no_name` (one concept, anti-hacking "
        "rule) and `yes_no_name_multi` (fraction of names). Their 100-character minimum is kept: "
        "every well-formed caption of this world is at least 108 characters long, so only the names "
        "decide the reward.",
        "Prompts in RePIC's inference layout for warm start, GRPO and evaluation (see "
        "rlpt_fast/demo/rl.py for why not the training layout).",
        f"torch threads: {cfg.threads}; device: {trainer.device}.",
    ]
