"""The GRPO loss of one micro-batch: group-packed training forward, loss straight from hidden states.

Each prompt's group is packed as ONE sequence (prompt once, then its completions; see
rlpt_fast.model.packing), so prompt activations and their gradients are computed once per group.
The completion hidden states go to rlpt_kernels.grpo_loss_from_hidden, which never materializes
the (tokens x vocab) logits on the GPU. With a LoRA lm_head the head's adapter rides along as
extra columns (lm_head_operands), so the fused loss also trains it, dropout included.
Reference log-probs: the same packed forward with the adapter disabled, no grad (or a frozen copy
of the initial model under full fine-tuning).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from rlpt_kernels import grpo_loss_from_hidden, token_logprobs_from_hidden

from rlpt_fast.data import Row
from rlpt_fast.model.lora import adapter_disabled, lm_head_operands
from rlpt_fast.model.packing import Group, packed_forward, pad_completions
from rlpt_fast.prompts import Prompt
from rlpt_fast.train.config import GRPOSection


@dataclass
class Rollout:
    """One prompt and its G sampled, scored completions.

    image_embeds: (M, H) the prompt's image embeddings, encoded once per step and shared by the
    engine, the reference and the training forwards. advantages: (G,) float32. ref_logp /
    old_logp: (sum of completion lengths,) float32, completion by completion, or None.
    """
    row: Row
    prompt: Prompt
    image_embeds: torch.Tensor | None
    completions: list[list[int]]
    finish_reasons: list[str]
    rewards: list[float]
    texts: list[str]
    advantages: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completions]

    def group(self, model) -> Group:
        """The packing Group. A sampled image-pad token inside a completion is a plain token (the
        engine embeds it with embed_tokens), but packing fills every image-pad row from
        image_embeds, so such rows get the plain embedding appended here, in order."""
        image_id = model.config.image_token_id
        stray = sum(c[:-1].count(image_id) for c in self.completions)
        embeds, grid = self.image_embeds, self.prompt.image_grid_thw
        if stray:
            plain = model.model.language_model.embed_tokens(
                torch.full((stray,), image_id, dtype=torch.long, device=model.device))  # (stray, H)
            embeds = plain if embeds is None else torch.cat([embeds, plain.to(embeds.dtype)])
            grid = grid if grid is not None else torch.zeros(0, 3, dtype=torch.long)
        return Group(self.prompt.input_ids, [torch.tensor(c, dtype=torch.long) for c in self.completions],
                     image_grid_thw=grid, image_embeds=embeds)


def packed_tokens(model, rollouts: list[Rollout]) -> int:
    """Tokens one packed forward over these rollouts processes (prompt once per group)."""
    return sum(r.prompt.input_ids.numel() + sum(n - 1 for n in r.lengths) for r in rollouts)


def _split(flat: torch.Tensor, rollouts: list[Rollout]) -> list[torch.Tensor]:
    return list(flat.split([sum(r.lengths) for r in rollouts]))


@torch.no_grad()
def reference_logprobs(model, rollouts: list[Rollout], temperature: float,
                       ref_model: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """Per rollout, the reference policy's log-probs of its completion tokens, float32 (C_r,).
    ref_model None: `model` with its LoRA adapter disabled (the base model exactly)."""
    m = ref_model if ref_model is not None else model
    with adapter_disabled(m) if ref_model is None else nullcontext():
        hidden, packed = packed_forward(m, [r.group(m) for r in rollouts])  # (C, H)
        h, w = lm_head_operands(m, hidden)
        logp = token_logprobs_from_hidden(h, w, packed.target_ids, temperature)
    return _split(logp.float(), rollouts)


@dataclass
class LossOut:
    loss: torch.Tensor
    kl: float
    clip_ratio: float
    logp: list[torch.Tensor] | None  # per rollout, detached: the old log-probs when mu > 1


def policy_loss(model, rollouts: list[Rollout], cfg: GRPOSection, *, num_items: int,
                keep_logp: bool = False) -> LossOut:
    """GRPO loss of a micro-batch (differentiable w.r.t. the trainable weights).
    num_items: completion tokens of the whole accumulated batch (the "dapo" normalizer)."""
    hidden, packed = packed_forward(model, [r.group(model) for r in rollouts])  # (C, H)
    h, w = lm_head_operands(model, hidden)  # (C, H [+ r]), (V, H [+ r])
    lengths = packed.completion_lengths
    device = h.device
    mask = pad_completions(torch.ones(len(packed.target_ids), dtype=torch.bool, device=device), lengths, False)
    ids = pad_completions(packed.target_ids, lengths)
    adv = torch.cat([r.advantages for r in rollouts]).to(device)

    def padded(name: str) -> torch.Tensor | None:
        parts = [getattr(r, name) for r in rollouts]
        return None if any(p is None for p in parts) else pad_completions(torch.cat(parts).to(device), lengths)

    ref = padded("ref_logp") if cfg.beta > 0 else None
    loss, stats = grpo_loss_from_hidden(
        pad_completions(h, lengths), w, ids, adv, mask, old_logp=padded("old_logp"), ref_logp=ref,
        beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high, temperature=cfg.temperature,
        kl=cfg.kl, loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens,
        num_items_in_batch=float(num_items))
    logp = None
    if keep_logp:
        with torch.no_grad():
            flat = token_logprobs_from_hidden(h.detach(), w.detach(), packed.target_ids, cfg.temperature)
        logp = _split(flat.float(), rollouts)
    return LossOut(loss, float(stats["kl"]), float(stats["clip_ratio"]), logp)

