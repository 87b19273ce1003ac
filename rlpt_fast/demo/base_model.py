"""The demo's base model: a tiny Qwen2.5-VL given a short supervised warm start.

A random checkpoint of the real architecture (`rlpt_fast.testing.write_tiny_checkpoint`, with
the world's words in the tokenizer's BPE corpus so a caption is ~35 tokens) is trained with
teacher forcing on captions of the training scenes, in RePIC's inference layout (system prompt,
each reference image and its "i. Name: <X>, Info: ..." line, the query image, a question).
Most captions are generic; a few (`personal_rate`) name the concepts. The result behaves like
a base MLLM on this task: it captions the scene, and names the concepts only now and then when
sampling; greedy decoding names (almost) nothing. The vision tower stays frozen (random), as
it is in RePIC's GRPO: its embeddings are computed once per image and the decoder learns to
read them.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlpt_fast.model import QwenVLModel, load_model
from rlpt_fast.prompts import Prompt, PromptBuilder
from rlpt_fast.synthetic import scene_path
from rlpt_fast.testing import write_tiny_checkpoint

from .teacher_forcing import caption_loss
from .world import DemoWorld, corpus, question, scene_keys, warm_start_captions


@dataclass
class BaseModelConfig:
    """Size of the tiny model and its warm start: steps x batch prompts of teacher forcing at
    AdamW lr (cosine to 10%).

    personal_rate: fraction of warm-start captions that name the concepts (0 leaves RL nothing
    to reinforce: sampling never finds a name).
    steps: GRPO moves the model from its generic captions to its named ones, so the words after
    GRPO are only as good as the named captions the warm start taught; 1600 steps gave the
    margin that 1200 lacked at seed 2 (TUNING.md).
    ema: 0 = the warm start ends on its last weights; d in (0, 1) = on an exponential moving
    average of them (Polyak averaging, decay d). Off: it helped on 1 thread and hurt on 2
    (TUNING.md)."""
    hidden_size: int = 96
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden_size: int = 32
    personal_rate: float = 0.25
    steps: int = 1600
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    ema: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.personal_rate <= 1.0:
            raise ValueError(f"BaseModelConfig.personal_rate must be in [0, 1], got {self.personal_rate}")
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "steps", "batch"):
            if getattr(self, k) < 1:
                raise ValueError(f"BaseModelConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BaseModelConfig.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if not self.lr > 0:
            raise ValueError(f"BaseModelConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"BaseModelConfig.ema must be in [0, 1), got {self.ema}")


def write_random_checkpoint(path: str | Path, dw: DemoWorld, cfg: BaseModelConfig, seed: int) -> Path:
    """A random-weight Qwen2.5-VL checkpoint directory whose tokenizer knows the world's words."""
    return write_tiny_checkpoint(
        path, "qwen2_5_vl", seed, corpus=corpus(dw.world), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        vision_config={"hidden_size": cfg.vision_hidden_size,
                       "intermediate_size": 2 * cfg.vision_hidden_size})


def inference_prompt(builder: PromptBuilder, dw: DemoWorld, keys: list[str], image,
                     question_index: int) -> Prompt:
    """RePIC's inference layout for the concepts `keys` (database order) and a query image."""
    concepts = dw.database.select(keys)
    return builder.inference_prompt(concepts, image, question(question_index, len(concepts)))


def scene_prompt(builder: PromptBuilder, dw: DemoWorld, scene, question_index: int) -> Prompt:
    return inference_prompt(builder, dw, scene_keys(dw.world, scene),
                            dw.files.root / scene_path(scene), question_index)


def caption_ids(builder: PromptBuilder, text: str) -> torch.Tensor:
    """Token ids of a caption followed by the end-of-turn token the engine stops on."""
    tok = builder.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    return torch.tensor(ids, dtype=torch.long)


def warm_start(model: QwenVLModel, builder: PromptBuilder, dw: DemoWorld, cfg: BaseModelConfig,
               seed: int, log=print) -> list[float]:
    """Teacher-forced cross-entropy on warm-start captions; returns the loss per step.
    The model is left in eval mode."""
    n = cfg.steps * cfg.batch
    scenes = dw.warm_start_scenes
    epochs = -(-n // len(scenes))
    items = warm_start_captions(dw.world, scenes, cfg.personal_rate, epochs, seed)[:n]
    prompts = {}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.steps))
    average = WeightAverage(params, cfg.ema) if cfg.ema else None
    losses, t0 = [], time.time()
    for step in range(cfg.steps):
        batch, targets = [], []
        for sc, text, q in items[step * cfg.batch:(step + 1) * cfg.batch]:
            if (sc.index, q) not in prompts:
                prompts[sc.index, q] = scene_prompt(builder, dw, sc, q)
            batch.append(prompts[sc.index, q])
            targets.append(caption_ids(builder, text))
        loss = caption_loss(model, batch, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if average is not None:
            average.update()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"warm start {step + 1}/{cfg.steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    if average is not None:
        average.copy_to()
    model.eval()
    return losses


class WeightAverage:
    """Exponential moving average of parameters, updated after each optimizer step. The decay
    at update t is min(decay, (1 + t) / (10 + t)) so the random initial weights are forgotten
    quickly. copy_to writes the average into the parameters (in place)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay, self.t = params, decay, 0
        self.avg = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        for p, a in zip(self.params, self.avg):
            a.lerp_(p.detach(), 1.0 - d)
        self.t += 1

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, a in zip(self.params, self.avg):
            p.copy_(a)


def _cosine(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def save_checkpoint(model: QwenVLModel, source: Path, out: Path) -> Path:
    """The model's weights as a Hugging Face directory (files other than weights from source)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def build_base_model(work: Path, dw: DemoWorld, cfg: BaseModelConfig, seed: int,
                     log=print) -> tuple[Path, list[float]]:
    """Random checkpoint -> warm start -> `work/base` (a loadable checkpoint directory)."""
    torch.manual_seed(seed)
    random_dir = write_random_checkpoint(work / "random", dw, cfg, seed)
    model = load_model(random_dir)
    builder = PromptBuilder(random_dir)
    losses = warm_start(model, builder, dw, cfg, seed, log)
    return save_checkpoint(model, random_dir, work / "base"), losses
