"""Rollout generation: our Engine against transformers' generate on the same model, GRPO-shaped.

Workload: B prompts x G samples (G = 8), each prompt about P tokens of which most are one image's
placeholders, N new tokens per sample with EOS ignored (every sample runs to N), temperature 1.
Engine: each prompt prefilled once and forked into G sequences over a paged KV cache, all B*G
decoded together. Baseline: model.generate(num_return_sequences=G, do_sample=True), which expands
every prompt (and its image) G times before prefill.

Reported per engine: wall time, generated tokens/s, prefill tokens, peak memory (CUDA), decode
step time and its floor = (decoder weight bytes + KV bytes the step reads) / measured bandwidth,
with the model's own cost accounting: floor_ms counts every sample's whole context (what a
per-sequence paged kernel reads); shared_floor_ms counts each prompt once per group (what the
cascade decode reads, the default). Goals: CPU (tiny model, small shapes) >= 3x generate; GPU
(random-weight Qwen2.5-VL-3B shape, B = 16) >= 10x generate and decode within 1.6x its floor.

    python benchmarks/bench_rollout.py                      # auto: GPU 3B shape, else CPU tiny
    python benchmarks/bench_rollout.py --batch 4 --new-tokens 64
    python benchmarks/bench_rollout.py --lora 64            # the trainer's rollout: LoRA r 64

--lora R: LoRA rank R on every decoder Linear and lm_head (fp32 adapters, B non-zero) and three
engines timed alternately in one run: the cached inference path (model/lora_inference.py, 3 kernels
per Linear), the per-call cast path it replaced (lora_inference.ENABLED = False; env
RLPT_LORA_INFERENCE_CACHE=0 does the same for any run), and the adapter off (the floor of what LoRA
can cost). No generate baseline then (it has no adapter); floors add the adapters' bytes in the
model's dtype. On the CPU in fp32 the casts are no-ops: the cached path saves only ops there.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, measure_ceilings

QWEN25_VL_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=128000)
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=16 if gpu else 4, help="prompts (B)")
    g.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    g.add_argument("--prompt-tokens", type=int, default=1200, help="about this many per prompt")
    g.add_argument("--new-tokens", type=int, default=256, help="tokens generated per sample")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=["auto", "tiny", "3b"], default="auto", help="auto: 3b on GPU, tiny on CPU")
    m.add_argument("--device", default="cuda" if gpu else "cpu")
    m.add_argument("--lora", type=int, default=0, metavar="R",
                   help="LoRA rank R on every decoder Linear and lm_head: cached vs per-call cast vs adapter off")
    m.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: small ops on a shared machine are fastest and steadiest)")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--no-cuda-graphs", action="store_true")
    e.add_argument("--no-cascade", action="store_true", help="read each sample's prompt KV separately")
    e.add_argument("--no-pack", action="store_true",
                   help="leave q/k/v and gate/up unpacked (5 projection GEMMs per layer instead of 2)")
    e.add_argument("--skip-hf", action="store_true", help="engine only (no baseline)")
    e.add_argument("--repeat", type=int, default=1 if gpu else 3,
                   help="alternate engine / generate runs this many times and keep each one's fastest "
                        "(a shared CPU's load drifts between runs)")
    return p.parse_args()


def build_models(kind: str, device: str, dtype: torch.dtype, tmp: Path):
    """(ours, transformers') with identical random weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from rlpt_fast.model import QwenVLModel, load_config, load_model
    from rlpt_fast.testing import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp / "ckpt", "qwen2_5_vl", seed=0)
    if kind == "tiny":
        theirs = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
        return load_model(path, dtype=dtype, device=device), theirs.to(device).eval()
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(QWEN25_VL_3B)
    cfg["vision_config"].update(QWEN25_VL_3B_VISION)
    (path / "config.json").write_text(json.dumps(cfg))
    with torch.device(device):
        theirs = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()
    with torch.device("meta"):
        ours = QwenVLModel(load_config(path))
    ours.to(dtype=dtype).to_empty(device=device)
    ours.tie_weights()
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if ours.config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights do not line up: missing {sorted(missing)[:5]}, unexpected {result.unexpected_keys[:5]}")
    return ours.eval(), theirs


def build_prompts(cfg, batch: int, prompt_tokens: int, seed: int = 0):
    """Per prompt: text, one image of about 2/3 of the tokens, text. Same length for all prompts."""
    gen = torch.Generator().manual_seed(seed)
    side = max(2, int((2 * prompt_tokens / 3) ** 0.5))  # merged grid side
    grid = torch.tensor([[1, 2 * side, 2 * side]])
    text = max(2, prompt_tokens - side * side - 2)
    out = []
    for _ in range(batch):
        ids = torch.cat([torch.randint(0, 300, (text // 2,), generator=gen), torch.tensor([cfg.vision_start_token_id]),
                         torch.full((side * side,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                         torch.randint(0, 300, (text - text // 2,), generator=gen)])
        pixels = torch.randn(int(grid.prod()), cfg.vision.patch_dim, generator=gen)
        out.append((ids, pixels, grid))
    return out


def run_engine(model, prompts, args, device):
    from rlpt_fast.rollout import Engine, Request, SamplingParams

    t, n = prompts[0][0].numel(), args.new_tokens
    bs = args.block_size
    blocks = len(prompts) * (-(-t // bs)) + len(prompts) * args.group * (-(-n // bs) + 2) + 16
    engine = Engine(model, block_size=bs, num_blocks=blocks, max_num_seqs=len(prompts) * args.group,
                    max_num_batched_tokens=8192, max_model_len=t + n + bs,
                    cuda_graphs=False if args.no_cuda_graphs else None, cascade_decode=not args.no_cascade,
                    pack_projections=not args.no_pack)
    requests = [Request(*p) for p in prompts]
    params = SamplingParams(n=args.group, temperature=1.0, max_tokens=n, ignore_eos=True, seed=0)
    # warm-up on the timed call's shapes (every prompt, G samples, 2 tokens), as generate's
    # warm-up is: kernels built for the first time at a new shape are not the engine's speed
    engine.generate(requests, SamplingParams(n=args.group, temperature=1.0, max_tokens=2, ignore_eos=True, seed=1))
    model.clear_image_cache()
    for key in engine.stats:
        engine.stats[key] = 0
    run = lambda: engine.generate(requests, params)
    wall, peak, outs = timed(run, device)
    assert all(len(c.token_ids) == n for o in outs for c in o)
    s = engine.stats
    step_ms = 1e3 * s["decode_seconds"] / max(1, s["decode_steps"])
    # where the wall goes: the steps' own clocks; the rest is set-up (the images encoded, requests
    # checked and queued) and the call's exit
    split = dict(prefill_s=s["prefill_seconds"], decode_s=s["decode_seconds"],
                 setup_s=wall - s["prefill_seconds"] - s["decode_seconds"])
    return dict(wall_s=wall, **split, prefill_tokens=s["prefill_tokens"], peak_gib=peak,
                decode_batch=len(prompts) * args.group, decode_step_ms=step_ms,
                kv_cache_gib=engine.num_blocks * engine.runner.block_bytes / 2**30, preemptions=s["preemptions"])


def run_hf(model, prompts, args, device):
    ids = torch.stack([p[0] for p in prompts]).to(device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.cat([p[1] for p in prompts]).to(device),
                  image_grid_thw=torch.cat([p[2] for p in prompts]).to(device), do_sample=True, temperature=1.0, top_k=0,
                  top_p=1.0, num_return_sequences=args.group)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kwargs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    gen = lambda k: model.generate(**kwargs, max_new_tokens=k, min_new_tokens=k)
    with torch.no_grad():
        gen(2)  # warm-up
        wall, peak, out = timed(lambda: gen(args.new_tokens), device)
    assert out.shape[1] == ids.shape[1] + args.new_tokens
    return dict(wall_s=wall, prefill_tokens=ids.numel() * args.group, peak_gib=peak)


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return wall, peak, out


def add_lora(model, r: int) -> int:
    """LoRA r (alpha 2r, fp32 adapters) on every decoder Linear and lm_head, B ~ N(0, 0.02^2);
    returns the adapters' bytes in the model's dtype."""
    from rlpt_fast.model.lora import LoRAConfig, apply_lora, lora_layers

    apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    numel = 0
    with torch.no_grad():
        for _, layer in lora_layers(model):
            b = layer.lora_B.weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
            numel += b.numel() + layer.lora_A.weight.numel()
    return numel * model.dtype.itemsize


def engine_variants(model, lora: bool) -> list[tuple[str, object]]:
    """(row name, context factory) of each engine timed; the first one gives the summary."""
    if not lora:
        return [("rlpt Engine", nullcontext)]
    from rlpt_fast.model import lora_inference
    from rlpt_fast.model.lora import adapter_disabled

    @contextmanager
    def cache(enabled: bool):
        before = lora_inference.ENABLED
        lora_inference.ENABLED = enabled
        try:
            yield
        finally:
            lora_inference.ENABLED = before

    return [("LoRA cached", lambda: cache(True)), ("LoRA per-call cast", lambda: cache(False)),
            ("adapter off", lambda: adapter_disabled(model))]


def decode_floor_ms(model, prompts, args, bandwidth_gbps: float, shared: bool = False) -> float:
    """(weights + KV read by one decode step at the run's mean context) / bandwidth. shared: the
    prompt's KV counted once per group (what the cascade decode must read), else once per sample."""
    t, g = prompts[0][0].numel(), args.group
    rows = len(prompts) * ((t + g * args.new_tokens / 2) if shared else g * (t + args.new_tokens / 2))
    read = model.weight_bytes() + rows * model.kv_bytes_per_token()
    return 1e3 * read / (bandwidth_gbps * 1e9)


def main() -> None:
    args = parse_args()
    kind = args.model if args.model != "auto" else ("3b" if args.device.startswith("cuda") else "tiny")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = build_models(kind, args.device, dtype, Path(tmp))
    prompts = build_prompts(ours.config, args.batch, args.prompt_tokens)
    ceil = measure_ceilings(args.device)
    # its own records file: the sweep table shows the newest record per subject
    report = Report("rollout_lora" if args.lora else "rollout", args.device)
    report.card = dict(model=f"{kind} qwen2_5_vl (random weights) {dtype}", batch=args.batch, group=args.group,
                       prompt_tokens=prompts[0][0].numel(), new_tokens=args.new_tokens, block_size=args.block_size,
                       threads=torch.get_num_threads(),
                       copy_gbps=round(ceil.copy_gbps, 1), weight_gib=round(ours.weight_bytes() / 2**30, 4))
    report.print_card()
    generated = args.batch * args.group * args.new_tokens
    floor = decode_floor_ms(ours, prompts, args, ceil.copy_gbps)
    shared_floor = decode_floor_ms(ours, prompts, args, ceil.copy_gbps, shared=True)
    if args.lora:
        lora_ms = 1e3 * add_lora(ours, args.lora) / (ceil.copy_gbps * 1e9)
        floor, shared_floor = floor + lora_ms, shared_floor + lora_ms
        report.card["lora"] = f"r{args.lora} on every decoder Linear and lm_head, fp32 adapters"
        args.skip_hf = True  # generate's model has no adapter
        print(report.card["lora"] + "; floors include the adapters' bytes in the model's dtype")
    variants = engine_variants(ours, bool(args.lora))
    eng_runs, hf_runs = {name: [] for name, _ in variants}, []
    for _ in range(args.repeat):
        for name, context in variants:
            with context():
                eng_runs[name].append(run_engine(ours, prompts, args, args.device))
        if not args.skip_hf:
            hf_runs.append(run_hf(theirs, prompts, args, args.device))
    best = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in eng_runs.items()}
    for name, run in best.items():
        report.rows.append(dict(engine=name, **run, tokens_per_s=generated / run["wall_s"], floor_ms=floor,
                                step_over_floor=run["decode_step_ms"] / floor, shared_floor_ms=shared_floor))
    eng = best[variants[0][0]]
    summary = dict(engine_tokens_per_s=generated / eng["wall_s"], decode_step_over_floor=eng["decode_step_ms"] / floor,
                   decode_step_over_shared_floor=eng["decode_step_ms"] / shared_floor, repeats=args.repeat,
                   cascade=not args.no_cascade, packed_projections=not args.no_pack, engine_wall_s=eng["wall_s"],
                   **{f"engine_{k}": eng[k] for k in ("setup_s", "prefill_s", "decode_s")})
    if args.lora:
        steps = {name: run["decode_step_ms"] for name, run in best.items()}
        summary.update(lora_rank=args.lora, decode_step_ms=steps,
                       cast_over_cached=steps["LoRA per-call cast"] / steps["LoRA cached"],
                       cached_over_adapter_off=steps["LoRA cached"] / steps["adapter off"])
    if hf_runs:
        hf = min(hf_runs, key=lambda r: r["wall_s"])
        report.rows.append(dict(engine="HF generate", **hf, tokens_per_s=generated / hf["wall_s"]))
        summary["speedup_vs_generate"] = hf["wall_s"] / eng["wall_s"]
        summary["goal"] = ">= 10x generate, decode <= 1.6x floor" if kind == "3b" else ">= 3x generate (CPU, tiny)"
    report.print_table(["engine", "wall_s", "setup_s", "prefill_s", "decode_s", "tokens_per_s", "prefill_tokens",
                        "peak_gib", "kv_cache_gib",
                        "decode_batch", "decode_step_ms", "floor_ms", "step_over_floor", "shared_floor_ms",
                        "preemptions"])
    report.finish(summary)


if __name__ == "__main__":
    main()
