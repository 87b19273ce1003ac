"""Training forward + backward of the GRPO loss with and without shared-prefix group packing.

A RePIC-shaped batch: each group is a prompt of about 1,200 tokens holding three images, and
G = 8 completions of 200 tokens. Unpacked, every completion is its own sequence [prompt;
completion] (G copies of the prompt); packed, the group is one sequence with the prompt once
(rlpt_fast.model.packing). Both run the same attention backend, LoRA (r=64 on every decoder Linear
and lm_head, as RECIPE.md), per-block gradient checkpointing and the fused loss from hidden states,
so the difference is the prompt computed once instead of G times.

Models are random-weight Qwen2.5-VL-3B / 7B shapes built on the device (no files). Image
embeddings are given (the tower is frozen and encodes each image once per step either way), so
only the decoder and loss are timed. Without a GPU the script runs a small model and batch.

    python benchmarks/bench_model.py                     # GPU: 3b and 7b; CPU: small
    python benchmarks/bench_model.py --models 7b --groups 2
"""
from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, measure_ceilings, peak_memory, time_fn

from rlpt_fast.model.config import parse_config
from rlpt_fast.model.lora import LoRAConfig, apply_lora, lm_head_operands
from rlpt_fast.model.model import QwenVLModel
from rlpt_fast.model.packing import (
    Group,
    default_backend,
    pack_groups,
    packed_forward,
    pad_completions,
)

QWEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "eos_token_id": 151645}
VISION_25 = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
             "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}
MODELS = {  # the config.json fields of the released checkpoints that set the shapes
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **QWEN_IDS),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, **QWEN_IDS),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False,
                  **{k: 2000 + i for i, k in enumerate(QWEN_IDS)}),
}


@dataclass
class BatchShape:
    """groups x (prompt of prompt_tokens with images of image_grids (t, h, w) patches, then G
    completions of completion_tokens)."""
    groups: int
    prompt_tokens: int
    image_grids: list[tuple[int, int, int]]
    g: int
    completion_tokens: int

    def __post_init__(self):
        if self.image_tokens() + 2 * len(self.image_grids) >= self.prompt_tokens:
            raise ValueError(f"images need {self.image_tokens()} tokens, prompt has {self.prompt_tokens}")

    def image_tokens(self) -> int:
        return sum(t * h * w // 4 for t, h, w in self.image_grids)


REPIC = BatchShape(1, 1200, [(1, 28, 28), (1, 24, 32), (1, 32, 24)], 8, 200)
SMALL = BatchShape(1, 160, [(1, 4, 8), (1, 8, 4), (1, 4, 4)], 4, 32)


def build_model(name: str, device: str, dtype: torch.dtype) -> QwenVLModel:
    half = MODELS[name]["hidden_size"] // MODELS[name]["num_attention_heads"] // 2
    t, h = half // 4, (half - half // 4) // 2  # Qwen's split of the rotary frequencies: [16, 24, 24] for 64
    vision = dict(VISION_25, out_hidden_size=MODELS[name]["hidden_size"])
    if name == "small":
        vision.update(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0])
    raw = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], rms_norm_eps=1e-6,
               rope_scaling={"type": "mrope", "mrope_section": [t, h, half - t - h]},
               rope_theta=1e6, vision_config=vision, **MODELS[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # random weights straight on the device
            return QwenVLModel(parse_config(raw))
    finally:
        torch.set_default_dtype(default)


def make_groups(model: QwenVLModel, shape: BatchShape, device: str, seed: int = 0) -> list[Group]:
    cfg, gen = model.config, torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, min(cfg.vocab_size, 1000), (n,), generator=gen)
    groups = []
    for _ in range(shape.groups):
        grids = torch.tensor(shape.image_grids)
        n_text = shape.prompt_tokens - shape.image_tokens() - 2 * len(shape.image_grids)
        parts = [text(n_text // 2)]
        for t, h, w in shape.image_grids:
            parts += [torch.tensor([cfg.vision_start_token_id]),
                      torch.full((t * h * w // 4,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id])]
        parts.append(text(n_text - n_text // 2))
        embeds = torch.randn(shape.image_tokens(), cfg.hidden_size, generator=gen).to(device, model.dtype)
        groups.append(Group(torch.cat(parts), [text(shape.completion_tokens) for _ in range(shape.g)],
                            image_grid_thw=grids, image_embeds=embeds))
    return groups


def train_step(model: QwenVLModel, groups: list[Group], share_prompt: bool) -> None:
    """Forward, fused GRPO loss over the completion tokens, backward; gradients dropped after."""
    import rlpt_kernels

    hidden, packed = packed_forward(model, groups, share_prompt=share_prompt)
    hidden, weight = lm_head_operands(model, hidden)
    lengths = packed.completion_lengths
    ids = pad_completions(packed.target_ids, lengths)
    mask = pad_completions(torch.ones_like(packed.target_ids, dtype=torch.bool), lengths, False)
    adv = torch.linspace(-1, 1, len(lengths), device=hidden.device)
    loss, _ = rlpt_kernels.grpo_loss_from_hidden(pad_completions(hidden, lengths), weight, ids, adv, mask)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def step_flops(model: QwenVLModel, groups: list[Group], share_prompt: bool) -> float:
    """Training FLOPs of one step: decoder per fed token at its own context, head per target."""
    cfg = model.config
    head = 6.0 * cfg.hidden_size * cfg.vocab_size  # forward + backward of lm_head, one token
    packed = pack_groups(model, groups, share_prompt=share_prompt)
    total = head * packed.target_ids.numel()
    for s, e in packed.seq_bounds:
        branch = packed.branch[s:e]
        prompt = int((branch == 0).sum())
        ctx = torch.arange(1, prompt + 1).tolist()
        for b in branch[branch > 0].unique().tolist():
            ctx += (prompt + torch.arange(1, int((branch == b).sum()) + 1)).tolist()
        base = model.flops_per_token(0, True) - head
        slope = model.flops_per_token(1, True) - model.flops_per_token(0, True)  # linear in context
        total += len(ctx) * base + slope * sum(ctx)
    return total


def measure(name: str, shape: BatchShape, args, device: str, dtype: torch.dtype, peak_tflops: float,
            report: Report) -> None:
    model = build_model(name, device, dtype)
    model.gradient_checkpointing = not args.no_checkpointing
    if not args.full:
        apply_lora(model, LoRAConfig(r=64, alpha=128, dropout=0.05))
    model.train()
    groups = make_groups(model, shape, device)
    times = {}
    for share in (False, True):
        def fn(share=share):
            train_step(model, groups, share)
        timing = time_fn(fn, device, warmup=args.warmup, repeat=args.repeat)
        flops = step_flops(model, groups, share)
        tokens = pack_groups(model, groups, share_prompt=share).input_ids.numel()
        times[share] = (timing.median, flops)
        rate = flops / (timing.median * 1e-3)
        peak = peak_memory(fn, device)
        report.rows.append({
            "model": name, "packing": "group" if share else "none", "tokens": tokens,
            "targets": shape.groups * shape.g * shape.completion_tokens, "ms": timing.median,
            "p20_ms": timing.p20, "p80_ms": timing.p80, "tflop": flops / 1e12, "tflops": rate / 1e12,
            "mfu": rate / (peak_tflops * 1e12), "peak_gib": None if peak is None else peak / 2**30})
        print(f"  {name} packing={'group' if share else 'none'}: {timing.median:.1f} ms", flush=True)  # if cut short
    (t_un, f_un), (t_pk, f_pk) = times[False], times[True]
    report.rows.append({"model": name, "packing": "saved", "ms": t_un - t_pk,
                        "tflop": (f_un - f_pk) / 1e12, "speedup": t_un / t_pk, "flop_ratio": f_un / f_pk})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma list of 3b,7b,small (default: 3b,7b on GPU, small on CPU)")
    p.add_argument("--groups", type=int, default=None, help="groups per batch (default 1)")
    p.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    p.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 GPU, 1 CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeat = args.repeat if args.repeat is not None else (10 if gpu else 3)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = (args.models or ("3b,7b" if device == "cuda" else "small")).split(",")
    ceilings = measure_ceilings(device)
    report = Report("model", device)
    shapes = {n: replace(SMALL if n == "small" else REPIC, groups=args.groups or 1) for n in names}
    report.card.update(
        models=",".join(names), dtype=str(dtype).removeprefix("torch."),
        batch="; ".join(f"{n}: {s.groups} x (prompt {s.prompt_tokens} with {len(s.image_grids)} images, "
                        f"G={s.g} x {s.completion_tokens})" for n, s in shapes.items()),
        lora="none (full weights)" if args.full else "r=64 alpha=128 dropout=0.05",
        checkpointing=not args.no_checkpointing, attention=default_backend(device),
        matmul_tflops=float(f"{ceilings.matmul_tflops:.3g}"),
        mfu_basis="FLOPs (model.flops_per_token) / time / measured dense matmul rate",
        baseline="packing none = each completion its own sequence [prompt; completion]")
    report.print_card()
    for name in names:
        measure(name, shapes[name], args, device, dtype, ceilings.matmul_tflops, report)
        gc.collect()  # the model goes with measure's frame; free it before building the next
        if gpu:
            torch.cuda.empty_cache()
    report.print_table(["model", "packing", "tokens", "targets", "ms", "p20_ms", "p80_ms", "tflop",
                        "tflops", "mfu", "peak_gib", "speedup", "flop_ratio"])
    saved = [r for r in report.rows if r["packing"] == "saved"]
    return report.finish({r["model"]: {"speedup": r["speedup"], "flop_ratio": r["flop_ratio"]} for r in saved})


if __name__ == "__main__":
    main()
