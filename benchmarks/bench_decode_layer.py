"""One decoder layer's decode step: eager torch ops against the fused inference kernels.

A decode step at batch 64-128 is launch-bound: ~35 kernels per layer, most of them tiny
elementwise ones (a bf16 RMSNorm alone is ~7). The fused path (rlpt_fast.model.decoder, taken
when no gradient is needed on the Triton backend) runs each residual add + RMSNorm, the q/k rotary
and SwiGLU's SiLU * up as one kernel each; path `packed` is the fused one over packed projections
(q/k/v one GEMM, gate/up one: rlpt_fast/model/packed_linear.py) with the q/k rotary in the launch
that writes K/V into the paged cache (rollout/kv_store.py), as the engine runs it. The paths
are timed as the engine runs them: inside a
CUDA graph, over a chain of `--layers` distinct random-weight layers of Qwen2.5-VL-3B's shape
(bf16), reported per layer, beside the floor (one layer's weight bytes / measured copy bandwidth).
Attention stores K/V into a paged cache as the engine does and then passes q through: attending is
the same in every path and bench_rollout measures it. Kernels per layer are counted two ways: launches seen by the dispatcher (non-view aten
ops + Triton launches; any device) and GPU activities in torch.profiler (CUDA only, no graph).

    python benchmarks/bench_decode_layer.py                  # GPU: 3b (and --models 3b,7b), rows 64,128
    python benchmarks/bench_decode_layer.py --rows 128 --layers 8

Without a GPU it is a dry run: a small shape, the fused kernels in Triton's interpreter; its
timings say nothing about the device (the card says so) and only the launch counts carry over.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before rlpt_kernels defines its kernels: the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["RLPT_KERNELS_BACKEND"] = "triton"  # the fused path's ops on Triton, not the CPU reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, measure_ceilings, time_fn  # noqa: E402

from rlpt_fast.launch_count import count_launches  # noqa: E402
from rlpt_fast.model.config import parse_config  # noqa: E402
from rlpt_fast.model.decoder import DecoderLayer  # noqa: E402
from rlpt_fast.model.packed_linear import pack_projections  # noqa: E402
from rlpt_fast.model.rope import mrope_cos_sin, rotary_tables  # noqa: E402
from rlpt_fast.rollout.kv_store import rotary_store_kv, store_kv  # noqa: E402

SHAPES = {  # the text-config fields of the released checkpoints that shape one layer
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
    "small": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2),
}


def build_layers(name: str, count: int, device: str, dtype: torch.dtype) -> list[DecoderLayer]:
    half = SHAPES[name]["hidden_size"] // SHAPES[name]["num_attention_heads"] // 2
    t, h = half // 4, (half - half // 4) // 2
    ids = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003,
               eos_token_id=1004)  # a layer never sees them; the config wants them
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0],
                  out_hidden_size=SHAPES[name]["hidden_size"])
    raw = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], vocab_size=1024, num_hidden_layers=count,
               rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [t, h, half - t - h]},
               vision_config=vision, **ids, **SHAPES[name])
    cfg = parse_config(raw)
    with torch.device(device), torch.no_grad():
        layers = [DecoderLayer(cfg, i).to(dtype).eval() for i in range(count)]
        for layer in layers:  # norms of ones would hide a wrong weight multiply: jitter them
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.normal_(1.0, 0.1)
    return layers


class StoreOnlyAttention:
    """The engine's K/V store (one cache slot per row, every layer writing the same cache), then q
    passed through. fuses_rotary: the decoder hands q/k unrotated and the store rotates them
    (rollout/attention.py does the same on its Triton backend)."""

    def __init__(self, rows: int, heads: int, kv_heads: int, head_dim: int, device: str, dtype: torch.dtype,
                 fuses_rotary: bool):
        self.k_cache = torch.zeros(rows, 1, kv_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.slots = torch.arange(rows, device=device)
        self.fuses_rotary = fuses_rotary

    def __call__(self, layer_idx, q, k, v, rotary=None):
        if rotary is not None:
            q, k = rotary_store_kv(q, k, v, *rotary, self.k_cache, self.v_cache, self.slots)
        else:
            store_kv(k, v, self.k_cache, self.v_cache, self.slots)
        return q


class Step:
    """Static inputs of a decode step over the layer chain; `eager()` / `fused()` / `packed()` run
    it once (`packed()` is `fused()` with rotary in the K/V store: the caller packs the layers first)."""

    def __init__(self, layers: list[DecoderLayer], rows: int, device: str, dtype: torch.dtype):
        cfg = layers[0].self_attn
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = layers[0].input_layernorm.weight.shape[0]
        self.layers = layers
        self.x = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
        self.residual = torch.randn(rows, hidden, device=device, dtype=dtype, generator=gen)
        positions = (torch.arange(rows, device=device) + 1200).expand(3, rows)  # decode: one row per sequence
        self.cos, self.sin = rotary_tables(*mrope_cos_sin(positions, cfg.head_dim, 1e6, [cfg.head_dim // 2, 0, 0], dtype))
        self.attention = {fuses: StoreOnlyAttention(rows, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, device,
                                                    dtype, fuses) for fuses in (False, True)}

    def eager(self) -> torch.Tensor:
        x = self.x
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.attention[False])
        return x

    def fused(self, fuses_rotary: bool = False) -> torch.Tensor:
        x, residual = self.x, self.residual
        for layer in self.layers:
            x, residual = layer(x, self.cos, self.sin, self.attention[fuses_rotary], residual, fused=True)
        return x

    def packed(self) -> torch.Tensor:
        return self.fused(fuses_rotary=True)


def profiler_kernels(fn, device: str) -> int | None:
    """GPU activities (kernels, memsets, copies) of one fn() in torch.profiler; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def graphed(fn, device: str):
    """fn captured in a CUDA graph (its replay), or fn itself off CUDA."""
    if not device.startswith("cuda"):
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the Triton kernels and warms the allocator
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def layer_bytes(layer: DecoderLayer) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def bench_one(name: str, rows: int, args, device: str, dtype: torch.dtype, copy_gbps: float, report: Report) -> None:
    layers = build_layers(name, args.layers, device, dtype)
    step = Step(layers, rows, device, dtype)
    floor_ms = layer_bytes(layers[0]) / (copy_gbps * 1e9) * 1e3
    # counts per layer, in bf16 (the CPU times fp32, but a bf16 RMSNorm is more kernels than fp32's)
    bf16 = torch.bfloat16
    one_layer = Step(layers[:1] if dtype == bf16 else build_layers(name, 1, device, bf16), rows, device, bf16)
    result = {}
    with torch.inference_mode():
        for path in ("eager", "fused", "packed"):
            if path == "packed":  # after the unpacked paths: packed weights serve the eager path too
                for layer in layers + one_layer.layers:
                    pack_projections(layer)
            fn = getattr(step, path)
            launches = count_launches(getattr(one_layer, path))
            graph_t = time_fn(graphed(fn, device), device, warmup=args.warmup, repeat=args.repeat)
            plain_t = time_fn(fn, device, warmup=args.warmup, repeat=args.repeat)
            result[path] = graph_t.median / args.layers
            report.rows.append({
                "model": name, "rows": rows, "path": path, "launches": launches,
                "gpu_kernels": profiler_kernels(getattr(one_layer, path), device),
                "graph_ms": result[path], "p20_ms": graph_t.p20 / args.layers, "p80_ms": graph_t.p80 / args.layers,
                "nograph_ms": plain_t.median / args.layers, "floor_ms": floor_ms,
                "x_floor": result[path] / floor_ms})
            if path != "eager":
                report.rows[-1]["speedup"] = result["eager"] / result[path]
    del layers, step, one_layer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma list of 3b,7b,small (default: 3b on GPU, small on CPU)")
    p.add_argument("--rows", default=None, help="comma list of decode batch sizes (default 64,128 GPU; 4 CPU)")
    p.add_argument("--layers", type=int, default=None, help="distinct layers chained per step (default 8 GPU, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps (default 50 GPU, 3 CPU)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    models = (args.models or ("3b" if gpu else "small")).split(",")
    rows = [int(r) for r in (args.rows or ("64,128" if gpu else "4")).split(",")]
    args.layers = args.layers or (8 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.repeat = args.repeat or (50 if gpu else 3)
    dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter computes bf16 wrongly
    ceilings = measure_ceilings(device)
    report = Report("decode_layer", device)
    report.card.update(models=models, rows=rows, layers_chained=args.layers, dtype=str(dtype).removeprefix("torch."),
                       attention="K/V store, then q passed through (attending is the same in every path)",
                       launches="per layer in bf16, counted by the dispatcher", copy_gbps=round(ceilings.copy_gbps, 1),
                       timing="CUDA graph replay, per layer" if gpu else
                       "DRY RUN: fused kernels in Triton's interpreter; CPU times are not a result")
    report.print_card()
    for name in models:
        for r in rows:
            bench_one(name, r, args, device, dtype, ceilings.copy_gbps, report)
    report.print_table(["model", "rows", "path", "launches", "gpu_kernels", "graph_ms", "p20_ms", "p80_ms",
                        "nograph_ms", "floor_ms", "x_floor", "speedup"])
    summary = {f"{r['model']} rows {r['rows']} {r['path']}": {"speedup": r["speedup"], "ms": r["graph_ms"],
                                                              "x_floor": r["x_floor"]}
               for r in report.rows if "speedup" in r}
    summary["launches_per_layer"] = {r["path"]: r["launches"] for r in report.rows[:3]}
    return report.finish(summary)


if __name__ == "__main__":
    main()
