"""Trainer: GRPO post-training of a Qwen-VL model on RePIC-format rows.

    rlpt train run.toml [--section.key=value ...] [--resume]       # one GPU, or the CPU
    torchrun --nproc_per_node=8 --no-python rlpt train run.toml     # data-parallel over 8 GPUs
    Trainer(load_config("run.toml")).train()                        # the same from Python

One step (DESIGN.md, "One GRPO step"):
  1. take prompts_per_step * grad_accum rows; render them (data.prompt_layout: RePIC's training
     layout by default, or its inference layout rebuilt from the row), encode each
     distinct image once (the frozen vision tower's embeddings are reused all step);
  2. the engine samples G completions per prompt from the trainer's own weights (no copy);
  3. each completion is scored by its row's reward method; advantages are normalized per group;
  4. per micro-batch: reference log-probs (adapter disabled, no grad; skipped at beta 0), then
     the group-packed training forward and the fused GRPO loss from hidden states, backward;
  5. clip, AdamW (fused where available) at the schedule's learning rate. With mu > 1, steps 4-5
     repeat mu times on the same rollouts, old log-probs kept from the first pass.
A non-finite loss or gradient norm skips the update (logged); max_nonfinite in a row abort, after
saving the run as it stands (the aborting step ran to its end), so `--resume` continues it.
Any other error in a step (an image that no longer decodes, a reward that raised, out of memory)
that comes before the step's first optimizer update saves the steps done so far first, so
`--resume` retries that step exactly where the run stopped (guard.py).
Randomness: the engine's draws are seeded from (seed, step, prompt), the LoRA dropout from torch's
global generator, whose state checkpoints carry, so a resumed run repeats an uninterrupted one.

Under torchrun (`self.dist`, rlpt_fast.distributed.data_parallel) each rank takes its slice of
every micro-batch (whole groups), generates and trains on it; full fine-tuning is FSDP2-sharded
(the engine runs on weights gathered once per step), LoRA replicated with averaged adapter
gradients; metrics are reduced and rank 0 logs and writes. Alone, every `self.dist` call is a no-op.

Simplifications, on purpose: all of a step's rollouts are generated before any training (no overlap);
with mu = 1 the ratio is exactly 1 (old log-probs are the policy's own, detached), as in RePIC,
so the engine's sampling log-probs are not used; a sampled image-pad token is a plain token.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rlpt_fast.data import Row
from rlpt_fast.distributed import checkpointing as dist_ckpt
from rlpt_fast.distributed.data_parallel import DataParallel
from rlpt_fast.model.packing import default_backend
from rlpt_fast.prompt_layout import row_prompt
from rlpt_fast.prompts import PromptBuilder, row_rng
from rlpt_fast.rollout import Engine, Request, SamplingParams
from rlpt_fast.train import checkpoint as ckpt
from rlpt_fast.train.build import build_models, engine_config
from rlpt_fast.train.config import TrainConfig
from rlpt_fast.train.guard import NonFiniteLossError, StepGuard, check_prompt_length, training_rows
from rlpt_fast.train.loss import Rollout, packed_tokens, policy_loss, reference_logprobs
from rlpt_fast.train.metrics import step_metrics
from rlpt_fast.train.monitor import Monitor
from rlpt_fast.train.optim import build_optimizer, lr_at, set_lr, trainable
from rlpt_fast.train.runtime import (
    PhaseTimer,
    derived_seed,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    seed_everything,
)
from rlpt_fast.train.scoring import RewardFn, import_reward, repic_reward, score_group
from rlpt_fast.train.stream import PromptStream


class Trainer:
    """config: a TrainConfig. reward_fn: (row, completion text, prompt) -> reward (default:
    RePIC's reward of the row's method). rows: training rows (default: load config.data.files).
    resume: continue from the latest checkpoint in train.output_dir, if there is one.
    model: an already built QwenVLModel to train (benchmarks with random weights); model.path then
    only provides the tokenizer and image processor. sampling_overrides: extra SamplingParams
    fields for every rollout (benchmarks: {"ignore_eos": True} for fixed-length completions)."""

    def __init__(self, config: TrainConfig, *, reward_fn: RewardFn | None = None,
                 rows: list[Row] | None = None, resume: bool = False, model: torch.nn.Module | None = None):
        self.cfg = cfg = config
        if not cfg.model.path:
            raise ValueError("model.path is empty: give the Qwen-VL checkpoint directory")
        self.output_dir = Path(cfg.train.output_dir)
        self.dist = DataParallel(cfg.model.device, cfg.train.dist_timeout_s)  # torchrun ranks (or one)
        self.device = self.dist.ctx.device if self.dist.distributed else resolve_device(cfg.model.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        self.resume_asked = resume
        self.resume_from = ckpt.latest_checkpoint(self.output_dir) if resume else None
        self.rows = rows = training_rows(cfg, rows)  # before the model: bad data fails fast, naming each bad row
        self.stream = PromptStream(rows, cfg.train.seed, shuffle=cfg.data.shuffle, task_mix=cfg.data.task_mix)
        # a batch that does not split across the ranks fails here, not at step 1 after the model loads
        self.dist.my_indices(cfg.train.prompts_per_step * cfg.train.grad_accum, cfg.train.grad_accum)
        if self.resume_from is not None:  # a corrupt checkpoint or changed data fails here, not after the model loads
            self._check_resume()
        self.reward_fn = reward_fn or (import_reward(cfg.grpo.reward_fn) if cfg.grpo.reward_fn
                                       else repic_reward(cfg.grpo.reward_compat))
        seed_everything(cfg.train.seed)
        self.model, self.ref_model = build_models(cfg, self.device, self.dtype, model, self.resume_from)
        self.model = self.dist.wrap(self.model, lora=cfg.lora.enabled)  # FSDP2, or adapters from rank 0
        self.dist.fork_rng(cfg.train.seed)  # LoRA dropout: each rank its own masks
        self.ref_model = self.dist.wrap_reference(self.ref_model)
        self.dtype, self.device = self.model.dtype, self.model.device
        self.sampling_overrides: dict = {}
        named = trainable(self.model)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.builder = PromptBuilder(cfg.model.path)
        self.tokenizer = self.builder.tokenizer
        with self.dist.gathered(self.model):
            self.engine = Engine(self.model, **engine_config(cfg, self.model))
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.state = ckpt.TrainerState()
        per_step = cfg.train.prompts_per_step * cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(rows) / per_step)
        if self.resume_from is not None:
            ckpt.remove_partial(self.output_dir)
            if self.dist.distributed:
                self.state, stream_state = dist_ckpt.load_trainer_checkpoint(self, self.resume_from)
            else:
                self.state, stream_state = ckpt.load_checkpoint(  # last: it restores the RNG states
                    self.resume_from, model=self.model, optimizer=self.optimizer,
                    param_names=self.param_names, lora=cfg.lora.enabled)
            self.stream.load_state_dict(stream_state)

    def _check_resume(self) -> None:
        """The checkpoint's files are there and its data position fits these rows and this seed."""
        meta = ckpt.check_checkpoint(self.resume_from, lora=self.cfg.lora.enabled)
        try:
            self.stream.load_state_dict(meta["stream"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{self.resume_from}: {e}") from None

    @property
    def total_updates(self) -> int:
        return self.total_steps * self.cfg.grpo.mu

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One generation batch and its mu optimizer updates; returns the step's metrics."""
        cfg, g = self.cfg, self.cfg.grpo
        timer = PhaseTimer(self.device)
        reset_peak_memory(self.device)
        engine_before = dict(self.engine.stats)
        picks = self.stream.take(cfg.train.prompts_per_step * cfg.train.grad_accum)
        mine = self.dist.my_indices(len(picks), cfg.train.grad_accum)  # whole groups of this rank
        rollouts = self._rollout([picks[i] for i in mine], mine)
        self.last_rollouts = rollouts  # for inspection (tests, reports); replaced every step
        timer.mark("rollout")
        self._score(rollouts)
        timer.mark("reward")
        pps = self.dist.local_micro_batch(cfg.train.prompts_per_step)
        micro = [rollouts[i:i + pps] for i in range(0, len(rollouts), pps)]
        if g.beta > 0:
            for mb in micro:
                self.dist.before_forward(self.ref_model or self.model)  # full FT: its root gathered
                for r, ref in zip(mb, reference_logprobs(self.model, mb, g.temperature, self.ref_model)):
                    r.ref_logp = ref
        timer.mark("reference")
        updates = [self._update(micro, timer, keep_old=g.mu > 1 and i == 0) for i in range(g.mu)]
        self.state.step += 1
        skipped = any(u["skipped"] for u in updates)
        self.state.nonfinite_streak = self.state.nonfinite_streak + 1 if skipped else 0
        metrics = step_metrics(self, rollouts, updates, timer.times, engine_before,
                               packed_tokens(self.model, rollouts) * g.mu)
        metrics = self.dist.reduce(metrics, completions=sum(len(r.completions) for r in rollouts),
                                   groups=len(rollouts))
        if self.state.nonfinite_streak >= cfg.train.max_nonfinite:
            raise NonFiniteLossError(
                f"aborting at step {self.state.step}: {self.state.nonfinite_streak} consecutive steps had a "
                f"non-finite loss or gradient (train.max_nonfinite={cfg.train.max_nonfinite}); "
                f"lower optim.lr, check the data, or use model.dtype=float32", metrics)
        return metrics

    def _rollout(self, picks: list[tuple[int, int]], indices: list[int] | None = None) -> list[Rollout]:
        """indices: the picks' places in the step's global prompt list (rollout seeds follow them,
        so a prompt samples the same completions whichever rank takes it)."""
        indices = list(range(len(picks))) if indices is None else indices
        cfg, g = self.cfg, self.cfg.grpo
        # embeddings live for this step only: bounded memory, and a resumed run encodes the same
        # batches of images as an uninterrupted one (bitwise-equal embeddings)
        self.model.clear_image_cache()
        prompts, embeds = [], []
        for epoch, idx in picks:
            p = row_prompt(self.builder, self.rows[idx], row_rng(cfg.train.seed, epoch, idx),
                           cfg.data.prompt_layout)
            check_prompt_length(self.rows[idx], p, self.engine.config.max_model_len)
            prompts.append(p)
            embeds.append(None if p.pixel_values is None else
                          self.model.encode_images(p.pixel_values, p.image_grid_thw))  # host pixels (see the model)
        requests = [Request(p.input_ids, p.pixel_values, p.image_grid_thw) for p in prompts]
        params = [SamplingParams(n=g.num_generations, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 max_tokens=g.max_new_tokens,
                                 seed=derived_seed("rollout", cfg.train.seed, self.state.step, i),
                                 **self.sampling_overrides)
                  for i in indices]
        with self.dist.gathered(self.model, self.engine):  # full FT: every rank's engine on full weights
            outs = self.engine.generate(requests, params)
        rollouts = []
        for (_, idx), p, e, comps in zip(picks, prompts, embeds, outs):
            ids = [list(c.token_ids) for c in comps]
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
            rollouts.append(Rollout(self.rows[idx], p, e, ids, [c.finish_reason for c in comps], [], texts))
        return rollouts

    def _score(self, rollouts: list[Rollout]) -> None:
        g = self.cfg.grpo
        for r in rollouts:
            r.rewards = score_group(self.reward_fn, r.row, r.texts, r.prompt)
        flat = torch.tensor([x for r in rollouts for x in r.rewards], dtype=torch.float32, device=self.device)
        adv = self.dist.advantages(flat, g.num_generations, g.scale_rewards)
        for r, a in zip(rollouts, adv.split(g.num_generations)):
            r.advantages = a

    def _update(self, micro: list[list[Rollout]], timer: PhaseTimer, keep_old: bool) -> dict:
        """One optimizer update over all micro-batches (gradient accumulation)."""
        g, opt = self.cfg.grpo, self.optimizer
        lr = lr_at(self.state.updates, self.total_updates, self.cfg.optim)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        num_items = self.dist.global_count(sum(sum(r.lengths) for mb in micro for r in mb))
        scale = 1.0 if g.loss_type == "dapo" else 1.0 / len(micro)  # dapo already divides by all tokens
        loss, kl, clip, finite = 0.0, 0.0, 0.0, True
        self.model.train()
        for mb in micro:
            self.dist.before_forward(self.model)  # full FT: its root gathered
            out = policy_loss(self.model, mb, g, num_items=num_items, keep_logp=keep_old)
            if not self.dist.agree(bool(torch.isfinite(out.loss).item())):  # all ranks skip, or none
                finite = False
                break
            factor = scale * self.dist.loss_factor(g.loss_type, sum(sum(r.lengths) for r in mb))
            (out.loss * factor).backward()
            loss, kl, clip = loss + out.loss.item() * factor, kl + out.kl / len(micro), clip + out.clip_ratio / len(micro)
            if keep_old:
                for r, lp in zip(mb, out.logp):
                    r.old_logp = lp
        timer.mark("train")
        norm = float("nan")
        if finite:
            max_norm = self.cfg.optim.max_grad_norm or float("inf")
            self.dist.finish_backward(self.params)  # LoRA: adapter gradients averaged over ranks
            norm = self.dist.clip(self.params, max_norm)
            finite = math.isfinite(norm)
        if finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.state.updates += 1
        timer.mark("optimizer")
        return {"loss": loss if finite else float("nan"), "kl": kl, "clip_ratio": clip, "grad_norm": norm,
                "lr": lr, "skipped": not finite}

    # ------------------------------------------------------------------ the run
    def save(self) -> Path:
        """Checkpoint of the current step (atomic); returns its directory."""
        if self.dist.distributed:  # + sharded trainer state; every rank takes part
            return dist_ckpt.save_trainer_checkpoint(self)
        return ckpt.save_checkpoint(
            self.output_dir, model=self.model, optimizer=self.optimizer, param_names=self.param_names,
            state=self.state, stream_state=self.stream.state_dict(), config=self.cfg.to_dict(),
            base_model_path=self.cfg.model.path, lora=self.cfg.lora.enabled, merged=self.cfg.train.save_merged)

    def train(self) -> dict:
        """Runs to total_steps with logging and checkpoints. Returns {"steps", "checkpoint",
        "metrics" (path), "plots" (paths), "last" (the last step's metrics)}."""
        t = self.cfg.train
        mon = self.dist.monitor(lambda: Monitor(self.output_dir, self.total_steps, progress=t.progress,  # rank 0
                                                tensorboard=t.tensorboard, plots=t.plots),
                                self.output_dir / "metrics.jsonl")
        mon.resume_at(self.state.step)
        if self.resume_from is not None:
            mon.message(f"resumed from {self.resume_from} (step {self.state.step})")
        elif self.resume_asked:  # a mistyped output_dir would otherwise start over without a word
            mon.message(f"--resume: no checkpoint in {ckpt.checkpoint_root(self.output_dir)}; starting from step 0")
        elif (old := ckpt.latest_checkpoint(self.output_dir)) is not None:
            mon.message(f"warning: {self.output_dir} holds checkpoints of an earlier run (latest {old.name}); "
                        "this fresh run overwrites them step by step (--resume continues that run instead)")
        if self.dist.is_main:
            (self.output_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        mon.message(self.dist.memory_plan(self.model, self.engine).table())
        if default_backend(self.device) == "flex":  # else the first steps look hung
            mon.message("the first two steps compile FlexAttention for the packed training forward "
                        "(about 95 s and 25 s for a 3B model on an H100; inductor's on-disk cache makes "
                        "later runs on the machine faster); RLPT_PACKED_ATTENTION=sdpa skips it")
        last, saved, first = {}, None, self.state.step + 1
        guard = StepGuard(self)  # a step that raises first saves the steps done
        try:
            while self.state.step < self.total_steps:
                guard.begin()
                try:
                    last = self.step()
                except NonFiniteLossError as e:
                    mon.log(e.metrics)
                    guard.aborted(e)  # saves the run; the message says where
                    mon.message(str(e))
                    raise
                except Exception as e:
                    guard.failed(e, mon.message)
                    raise
                mon.log(last)
                if self.state.step == first:  # the plan against what the first step measured
                    mon.message(self.dist.memory_check(self.model, self.optimizer, self.engine, last["peak_memory_mb"]))
                if last["skipped"]:
                    mon.message(f"step {last['step']}: non-finite loss or gradient, update skipped")
                if t.checkpoint_every and self.state.step % t.checkpoint_every == 0:
                    saved = self.save()
                    guard.saved(self.state.step)
            if saved is None or saved.name != ckpt.step_dir(self.output_dir, self.state.step).name:
                saved = self.save()
        finally:
            plots = mon.close()
        return {"steps": self.state.step, "checkpoint": str(saved), "metrics": str(mon.path),
                "plots": [str(p) for p in plots], "last": last}
