"""What each rank runs in the distributed tests; also imported by the tests for the 1-process reference.

    torchrun --standalone --nproc_per_node=2 tests/distributed/dist_worker.py SCENARIO CKPT OUT

SCENARIO: full | lora (train, compare against one process) | fail | hang (failure handling).
Results go to OUT/rank<r>.json (and safetensors files), which the tests compare.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlpt_fast.distributed import (
    DistContext,
    average_gradients,
    broadcast_parameters,
    check_plan,
    clip_grad_norm,
    fail_together,
    full_state_dict,
    gather_root,
    gathered_weights,
    init_distributed,
    load_sharded_state,
    measured_state,
    plan_memory,
    reduce_metrics,
    save_hf_model,
    save_sharded_state,
    shard_model,
    shard_prompts,
    shutdown,
)

STEPS, MICRO_BATCHES, LR, MAX_NORM = 3, 2, 1e-2, 0.5
ENGINE_PROMPTS = ([5, 9, 31, 7, 12], [40, 3, 3, 18, 22, 91, 11, 2])  # one per rank, different lengths


def make_groups(model, n: int = 4, g: int = 2):
    """n groups of g completions (equal g: then the mean over a micro-batch's sequences is the mean
    of the ranks' means). Group 1 carries an image, so the frozen vision tower runs too."""
    from rlpt_fast.model.packing import Group

    gen = torch.Generator().manual_seed(1)
    vocab = min(model.config.vocab_size, 300)
    vc = model.config.vision
    image_id = model.config.image_token_id
    groups = []
    for i in range(n):
        prompt = torch.randint(0, vocab, (6 + i,), generator=gen)
        comps = [torch.randint(0, vocab, (2 + (i + k) % 3,), generator=gen) for k in range(g)]
        pixels = grid = None
        if i == 1:
            prompt = torch.cat([prompt[:3], torch.full((4,), image_id), prompt[3:]])
            grid = torch.tensor([[1, 4, 4]])
            pixels = torch.randn(16, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=gen)
        groups.append(Group(prompt, comps, pixel_values=pixels, image_grid_thw=grid))
    return groups


def loss_of(model, groups) -> torch.Tensor:
    """Mean over sequences of each completion's mean token NLL (packed forward, head read directly
    as the fused GRPO loss does)."""
    from rlpt_fast.model.lora import lm_head_operands
    from rlpt_fast.model.packing import packed_forward

    hidden, packed = packed_forward(model, groups)
    h, w = lm_head_operands(model, hidden)
    logp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, packed.target_ids[:, None]).squeeze(-1)
    return -torch.stack([x.mean() for x in logp.split(packed.completion_lengths)]).mean()


def build(ckpt: str, ctx: DistContext, lora: bool):
    from rlpt_fast.model import load_model
    from rlpt_fast.model.lora import LoRAConfig, apply_lora

    model = load_model(ckpt)
    if lora:
        torch.manual_seed(ctx.rank)  # replicas start apart on purpose; rank 0's (= one process's) is broadcast
        apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(".visual." not in f".{name}")
        model.gradient_checkpointing = True  # FSDP2 must compose with checkpointed blocks
    model.train()
    if ctx.distributed and not lora:
        shard_model(model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    if lora:
        broadcast_parameters(params, ctx)
    return model, params


def train_step(model, params, opt, mine, ctx: DistContext, lora: bool) -> dict:
    opt.zero_grad(set_to_none=True)
    per_mb = len(mine) // MICRO_BATCHES
    total = 0.0
    for i in range(MICRO_BATCHES):
        gather_root(model)  # FSDP freed the root group after the last backward
        loss = loss_of(model, mine[i * per_mb:(i + 1) * per_mb]) / MICRO_BATCHES
        loss.backward()
        total += loss.item()
    if lora:
        average_gradients(params, ctx)
    norm = clip_grad_norm(params, MAX_NORM)
    opt.step()
    completions = sum(len(g.completions) for g in mine)
    return reduce_metrics(ctx, {"loss": total, "grad_norm": norm}, counts={"completions": completions})


def engine_run(model, ctx: DistContext) -> list[list[int]]:
    """Greedy completions on gathered weights: rank r takes prompt r (one process takes both)."""
    from rlpt_fast.rollout import Engine, Request, SamplingParams

    engine = Engine(model, num_blocks=32, max_num_seqs=4)
    prompts = shard_prompts(list(ENGINE_PROMPTS), ctx.world_size, ctx.rank)
    with gathered_weights(model):
        outs = engine.generate([Request(torch.tensor(p)) for p in prompts],
                               [SamplingParams(temperature=0.0, max_tokens=4 + 3 * len(p) % 5, ignore_eos=True)
                                for p in prompts])
    return [list(o[0].token_ids) for o in outs]


def run_training(ckpt: str, out: Path, ctx: DistContext, lora: bool) -> dict:
    """The scenario behind test_full_ft / test_lora; returns (and rank 0 writes) what is compared."""
    out.mkdir(parents=True, exist_ok=True)
    model, params = build(ckpt, ctx, lora)
    result = {"rank": ctx.rank}
    with gathered_weights(model):
        gathered = {n: p.detach().clone() for n, p in model.named_parameters()}
        result["logits_gathered"] = model.logits(torch.tensor(ENGINE_PROMPTS[1]))[-1].tolist()
    save_file(gathered, str(out / f"gathered{ctx.rank}.safetensors"))
    result["engine"] = engine_run(model, ctx)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=True)
    mine = shard_prompts(make_groups(model), ctx.world_size, ctx.rank, MICRO_BATCHES)
    result["steps"] = [train_step(model, params, opt, mine, ctx, lora) for _ in range(STEPS)]
    plan = plan_memory(model, world_size=ctx.world_size, sharded=ctx.distributed and not lora)
    result["memory_ok"], result["memory_lines"] = check_plan(plan, measured_state(model, opt))
    result["plan"] = plan.to_dict()
    final = full_state_dict(model)
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in final.items() if "lora_" in k or not lora}, str(out / "final.safetensors"))
    if not lora:
        save_hf_model(model, ctx, ckpt, out / "hf")
    elif ctx.is_main:  # replicated adapters: rank 0 writes the PEFT directory, as on one GPU
        from rlpt_fast.model.lora_io import save_adapter
        save_adapter(model, out / "adapter", ckpt)
    # DCP round trip: save, take a step, restore, take the same step again
    save_sharded_state(out / "dcp", model, opt, ctx)
    noise_before = torch.rand(3).tolist()
    result["after_save"] = train_step(model, params, opt, mine, ctx, lora)
    load_sharded_state(out / "dcp", model, opt, ctx)
    result["rng_restored"] = torch.rand(3).tolist() == noise_before
    result["after_load"] = train_step(model, params, opt, mine, ctx, lora)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    return result


def run_failure(ctx: DistContext, out: Path, hang: bool) -> None:
    """Rank 1 raises (or hangs); rank 0 waits in a collective and must stop with the error."""
    start = time.monotonic()
    try:
        with fail_together(ctx):
            if ctx.rank == 1:
                if hang:
                    time.sleep(300)
                raise ValueError("deliberate failure on rank 1")
            torch.distributed.all_reduce(torch.ones(1))
    except Exception as e:
        (out / f"rank{ctx.rank}.json").write_text(json.dumps(
    {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}))
        raise


def main(argv: list[str]) -> None:
    scenario, ckpt, out = argv[0], argv[1], Path(argv[2])
    if not torch.cuda.is_available():  # before rlpt_kernels defines its kernels (tests/conftest.py)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    timeout = float(os.environ.get("RLPT_TEST_TIMEOUT_S", "60"))
    ctx = init_distributed("cpu", timeout_s=timeout)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if scenario in ("full", "lora"):
            with fail_together(ctx):
                run_training(ckpt, out, ctx, lora=scenario == "lora")
        else:
            run_failure(ctx, out, hang=scenario == "hang")
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
