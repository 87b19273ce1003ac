"""Benchmark of rlpt_kernels against the ways the field computes the same thing.

Per op, in one run: naive torch (log_softmax + gather), TRL's selective_log_softmax, torch.compile
of the naive code, liger-kernel (fused selective log-softmax, triton_grpo_loss,
LigerFusedLinearGRPOLoss) where installed, and ours. Each figure stands beside its floor: bytes
that must move / measured copy bandwidth, or matmul FLOPs / measured bf16 matmul rate.

    python benchmarks/bench_kernels.py                 # GPU: 4K, 16K, 64K tokens, V 151936, H 3584
    python benchmarks/bench_kernels.py --tokens 4096   # one size

Goals on an H100 (checked here, never in tests): token_logprobs forward >= 85% of copy bandwidth;
grpo_loss forward+backward <= 0.8x liger's time with no more peak memory; the fused-linear loss
<= 1.2x the bare lm_head matmuls it replaces, with <= 1 GiB extra memory at 16K tokens.
Without a GPU it runs small shapes on the CPU, where "ours" is the torch reference backend, unless
RLPT_KERNELS_BACKEND=triton TRITON_INTERPRET=1 put the Triton kernels in the interpreter (the
sweep's dry run does: the launches the GPU stage makes, checked at tiny sizes).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, measure_ceilings, peak_memory, time_fn  # noqa: E402

import rlpt_kernels  # noqa: E402

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TRL = importlib.util.find_spec("trl") is not None


def naive_logprobs(logits, ids, temperature=1.0):
    return (logits.float() / temperature).log_softmax(-1).gather(-1, ids[..., None])[..., 0]


def candidates_logprobs(device: str) -> dict[str, Callable]:
    c = {"torch naive": naive_logprobs}
    if HAS_TRL:
        from trl.trainer.utils import selective_log_softmax
        c["trl selective"] = lambda x, i: selective_log_softmax(x, i)
    if device == "cuda":
        c["torch.compile"] = torch.compile(naive_logprobs)
        if HAS_LIGER:
            from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
            # liger takes (B, L + 1, V) and drops the last position: one sequence of our rows, so it
            # computes N - 1 of the N rows (the same work within 1/N)
            c["liger selective"] = lambda x, i: fused_selective_log_softmax(x[None], i[None], 1.0)
    c["ours"] = lambda x, i: rlpt_kernels.token_logprobs(x, i)
    return c


def grpo_inputs(B, T, V, device, dtype):
    logits = torch.randn(B, T + 1, V, device=device, dtype=dtype)  # liger drops the last position
    ids = torch.randint(0, V, (B, T), device=device)
    with torch.no_grad():
        old = naive_logprobs(logits[:, :-1], ids) + 0.1
    return logits, ids, torch.randn(B, device=device), torch.ones(B, T, device=device), old


def candidates_grpo(device: str) -> dict[str, Callable]:
    def reference(logits, ids, adv, mask, old):
        return rlpt_kernels.reference.grpo_loss(logits[:, :-1], ids, adv, mask, old_logp=old,
                                                ref_logp=old, beta=0.04, loss_type="dapo")[0]

    c = {"torch naive": reference}
    if device == "cuda":
        c["torch.compile"] = torch.compile(reference)
        if HAS_LIGER:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
            c["liger"] = lambda lg, i, a, m, o: triton_grpo_loss(
                lg, o, o, i, a, m, temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.2,
                inplace=True, loss_type="dapo", reduce=True)[0]
    # ours takes logits already shifted, (B, T, V): bench_grpo hands it its own such tensor
    c["ours"] = lambda lg, i, a, m, o: rlpt_kernels.grpo_loss(
        lg, i, a, m, old_logp=o, ref_logp=o, beta=0.04, loss_type="dapo", inplace_backward=True)[0]
    return c


def bench_logprobs(report, tokens, V, device, dtype, ceilings):
    logits = torch.randn(tokens, V, device=device, dtype=dtype)
    ids = torch.randint(0, V, (tokens,), device=device)
    floor_ms = tokens * V * logits.element_size() / (ceilings.copy_gbps * 1e9) * 1e3
    for name, fn in candidates_logprobs(device).items():
        _row(report, "token_logprobs fwd", name, tokens, lambda fn=fn: fn(logits, ids), device, floor_ms,
             tokens * V * logits.element_size())


def bench_grpo(report, tokens, V, device, dtype, ceilings):
    T = 256 if tokens >= 256 else tokens
    inputs = grpo_inputs(tokens // T, T, V, device, dtype)
    leaf = inputs[0].requires_grad_(True)
    moved = 3 * leaf.numel() * leaf.element_size()  # fwd read, bwd read + write
    floor_ms = moved / (ceilings.copy_gbps * 1e9) * 1e3
    # Ours reads (B, T, V) logits that predict the ids (the caller shifts, as a model whose
    # forward returns only the completion positions does): slicing logits[:, :-1] here would
    # time a copy of the whole tensor and its backward, not the kernel.
    shifted = inputs[0][:, :-1].detach().clone().requires_grad_(True)
    for name, fn in candidates_grpo(device).items():
        x = shifted if name == "ours" else leaf

        def step(fn=fn, x=x):  # liger and ours write the gradient over the logits (in place)
            x.grad = None
            fn(x, *inputs[1:]).backward()
        _row(report, "grpo_loss fwd+bwd", name, tokens, step, device, floor_ms, moved)


def bench_fused_linear(report, tokens, V, H, device, dtype, ceilings):
    B = max(1, tokens // 256)
    T = tokens // B
    h = torch.randn(B, T, H, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, device=device, dtype=dtype) / H**0.5).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), device=device)
    adv, mask = torch.randn(B, device=device), torch.ones(B, T, device=device)
    flops = 3 * 2 * tokens * V * H
    floor_ms = flops / (ceilings.matmul_tflops * 1e12) * 1e3

    def bare():  # the lm_head matmuls a fused loss replaces: forward, grad_h, grad_w
        logits = h.detach().view(-1, H) @ w.detach().t()
        logits @ w.detach()
        logits.t() @ h.detach().view(-1, H)

    def ours():
        h.grad = w.grad = None
        rlpt_kernels.grpo_loss_from_hidden(h, w, ids, adv, mask, loss_type="dapo")[0].backward()

    cands = {"bare matmuls": bare, "ours": ours}
    if device == "cuda" and HAS_LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")

        def liger_step():
            h.grad = w.grad = None
            liger(h, w, ids, mask, adv)[0].backward()
        cands["liger fused-linear"] = liger_step
    for name, fn in cands.items():
        _row(report, "fused-linear grpo fwd+bwd", name, tokens, fn, device, floor_ms, None)


def _row(report, op, name, tokens, fn, device, floor_ms, bytes_moved):
    try:
        t = time_fn(fn, device, warmup=2, repeat=10 if device == "cuda" else 3)
        peak = peak_memory(fn, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        report.rows.append({"op": op, "impl": name, "tokens": tokens, "status": "OOM"})
        return
    except Exception as e:  # noqa: BLE001 - a baseline's failure is a row, not the end of the run
        report.rows.append({"op": op, "impl": name, "tokens": tokens, "status": f"error: {e!r}"[:120]})
        print(f"  {op} / {name} @ {tokens}: {e!r}", flush=True)
        return
    row = {"op": op, "impl": name, "tokens": tokens, **t.as_dict(),
           "floor_ms": floor_ms, "pct_of_floor": 100 * floor_ms / t.median,
           "peak_gib": None if peak is None else peak / 2**30, "status": "ok"}
    if bytes_moved is not None:
        row["gbps"] = bytes_moved / (t.median * 1e-3) / 1e9
    report.rows.append(row)
    print(f"  {op} / {name} @ {tokens}: {t.median:.3f} ms", flush=True)  # progress, if cut short


def summarize(rows: list[dict]) -> dict:
    """The goals, as ratios (only where both sides were measured)."""
    def med(op, impl, tokens):
        for r in rows:
            if r["op"] == op and r["impl"] == impl and r["tokens"] == tokens and r["status"] == "ok":
                return r
        return None

    out = {}
    for tokens in sorted({r["tokens"] for r in rows}):
        ours = med("token_logprobs fwd", "ours", tokens)
        if ours:
            out[f"logprobs_fwd_pct_copy_bw@{tokens}"] = ours["pct_of_floor"]
        o, lg = med("grpo_loss fwd+bwd", "ours", tokens), med("grpo_loss fwd+bwd", "liger", tokens)
        if o and lg:
            out[f"grpo_vs_liger_time@{tokens}"] = o["median_ms"] / lg["median_ms"]
            if o["peak_gib"] is not None:
                out[f"grpo_vs_liger_peak@{tokens}"] = o["peak_gib"] / max(lg["peak_gib"], 1e-9)
        o = med("fused-linear grpo fwd+bwd", "ours", tokens)
        b = med("fused-linear grpo fwd+bwd", "bare matmuls", tokens)
        if o and b:
            out[f"fused_linear_vs_bare_time@{tokens}"] = o["median_ms"] / b["median_ms"]
    return out


def ours_backend(device: str) -> str:
    """Which implementation "ours" timed (rlpt_kernels.backend decides; the card says)."""
    from rlpt_kernels.backend import backend_for

    name = backend_for(torch.empty(0, device=device))
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return "triton (interpreter: times are not a result)"
    return name if name == "triton" else "torch reference"


def main(argv=None) -> dict:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384, 65536] if gpu else [256])
    p.add_argument("--vocab", type=int, default=151936 if gpu else 32768)
    p.add_argument("--hidden", type=int, default=3584 if gpu else 256)
    p.add_argument("--ops", nargs="*", default=["logprobs", "grpo", "fused_linear"])
    args = p.parse_args(argv)
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    ceilings = measure_ceilings(device)
    report = Report("kernels", device, card={
        "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens, "dtype": str(dtype),
        "copy_GBps": round(ceilings.copy_gbps, 1), "matmul_TFLOPs": round(ceilings.matmul_tflops, 2),
        "liger": HAS_LIGER, "trl": HAS_TRL, "ours": ours_backend(device)})
    report.print_card()
    for tokens in args.tokens:
        if "logprobs" in args.ops:
            bench_logprobs(report, tokens, args.vocab, device, dtype, ceilings)
        if "grpo" in args.ops:
            bench_grpo(report, tokens, args.vocab, device, dtype, ceilings)
        if "fused_linear" in args.ops:
            bench_fused_linear(report, tokens, args.vocab, args.hidden, device, dtype, ceilings)
    report.print_table(["op", "impl", "tokens", "median_ms", "p20_ms", "p80_ms", "gbps",
                        "pct_of_floor", "peak_gib", "status"])
    return report.finish(summarize(report.rows))


if __name__ == "__main__":
    main()
