"""Benchmark of rlpt_kernels against the ways the field computes the same thing.

Per op, in one run: naive torch (log_softmax + gather), TRL's selective_log_softmax, torch.compile
of the naive code, liger-kernel (fused selective log-softmax, triton_grpo_loss,
LigerFusedLinearGRPOLoss) where installed, and ours. Each figure stands beside its floor: bytes
that must move / measured copy bandwidth, or matmul FLOPs / measured bf16 matmul rate.

Before anything is timed, every candidate's values are checked against the fp32 reference on the
same inputs (log-probs; loss and gradients): a row records max_err and its tolerance. "ours"
beyond it is "wrong", the summary says values_ok false and the script exits 1 after its record
is written; a baseline beyond it only "differs" (its definitions may differ from ours).

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

# The fp32 reference runs over this many token rows at a time: at 64K tokens x V 151936 the whole
# fp32 logits (40 GB) would not fit beside the benchmark's own tensors.
CHECK_ROWS = 2048

# Tolerances on max_err (see max_err). fp32 (the CPU runs): both sides compute in fp32, they differ
# only in summation order, ~1e-6. bf16 (the GPU runs): log-probs are still fp32 math on the same
# bf16 logits, but over V 151936 in another order and with Triton's approximate exp; grpo_loss
# writes its gradient in bf16 (rounding 2^-9 = 2e-3 of an entry); the fused-linear loss keeps its
# logits in bf16 and accumulates grad_w in bf16 over ~40 chunks at 64K tokens (~1e-2). A wrong
# kernel (shifted ids, a missing clip mask or normalizer, a dropped chunk) errs by > 0.1.
TOLERANCE = {
    torch.float32: {"logprobs": 1e-4, "grpo": 1e-4, "fused_linear": 1e-4},
    torch.bfloat16: {"logprobs": 1e-3, "grpo": 1e-2, "fused_linear": 5e-2},
}


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
            # computes N - 1 of the N rows (the same work within 1/N). It scores row t with the
            # t-th of the LAST L ids it is given: hand it ids[:-1] to pair row t with ids[t]
            c["liger selective"] = lambda x, i: fused_selective_log_softmax(
                x[None], i[None, :-1], 1.0)
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


# ---- the value check: every candidate against the fp32 reference, before anything is timed ----
def max_err(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    """max |got - want| / scale; scale defaults to max |want|, a relative error that fits gradients
    (entries ~ 1 / tokens) as well as losses. NaN anywhere gives NaN, which no tolerance passes."""
    diff = (got.detach().float() - want.detach().float()).abs().max().item()
    scale = want.detach().abs().max().item() if scale is None else scale
    return diff / max(scale, 1e-30)


def _worst(errs: list[float]) -> float:
    return float(torch.tensor(errs).max())  # unlike max(), keeps a NaN


def _batch_slices(B: int, T: int):
    step = max(1, CHECK_ROWS // T)
    return [slice(s, s + step) for s in range(0, B, step)]


@torch.no_grad()
def logprobs_reference(logits, ids):
    return torch.cat([naive_logprobs(logits[s:s + CHECK_ROWS], ids[s:s + CHECK_ROWS])
                      for s in range(0, logits.shape[0], CHECK_ROWS)])


def check_logprobs(fn, logits, ids, want) -> float:
    """Absolute error: log-probs are O(log V) whatever the shape. Liger scores the first N - 1
    rows only (candidates_logprobs), so the comparison stops where its output does."""
    got = fn(logits, ids).reshape(-1)
    return max_err(got, want[:got.numel()], scale=1.0)


def grpo_reference(logits, ids, adv, mask, old):
    """(batch slice, its share of the loss, its fp32 logits gradient) over chunks of sequences:
    num_items_in_batch = the whole batch's token count makes the shares sum to the dapo loss."""
    n = float(mask.sum())
    for s in _batch_slices(*ids.shape):
        x = logits[s].detach().float().requires_grad_(True)  # a bf16 leaf would round its gradient
        loss = rlpt_kernels.reference.grpo_loss(
            x, ids[s], adv[s], mask[s], old_logp=old[s], ref_logp=old[s], beta=0.04,
            loss_type="dapo", num_items_in_batch=n)[0]
        loss.backward()
        yield s, loss.detach(), x.grad


def check_grpo(fn, x, inputs) -> float:
    """Loss and logits gradient over the T positions every candidate scores: ours reads the
    shifted (B, T, V) logits, liger and the naive code (B, T + 1, V) and drop the last position."""
    x = x.detach().clone().requires_grad_(True)  # ours and liger write the gradient over x
    loss = fn(x, *inputs[1:])
    loss.backward()
    want, errs = 0.0, []
    # the reference is recomputed per candidate, chunk by chunk: keeping its fp32 gradient for
    # all of them would cost 4 bytes x tokens x V (10 GB at 16K tokens, 40 GB at 64K)
    for s, part, grad in grpo_reference(inputs[0][:, :-1], *inputs[1:]):
        want = want + part
        errs.append(max_err(x.grad[s, :grad.shape[1]], grad))
    # a loss near 0 (advantages that cancel) is compared absolutely
    return _worst([max_err(loss, want, scale=max(abs(float(want)), 1.0)), *errs])


def fused_linear_reference(h, w, ids, adv, mask):
    """(loss, grad_h, grad_w) of the fp32 reference over chunks of sequences (as grpo_reference)."""
    n = float(mask.sum())
    wf = w.detach().float().requires_grad_(True)
    loss, grad_h = 0.0, torch.empty(h.shape, dtype=torch.float32, device=h.device)
    for s in _batch_slices(*ids.shape):
        hf = h[s].detach().float().requires_grad_(True)
        part = rlpt_kernels.reference.grpo_loss_from_hidden(
            hf, wf, ids[s], adv[s], mask[s], loss_type="dapo", num_items_in_batch=n)[0]
        part.backward()  # grad_w accumulates over the chunks, in fp32
        loss, grad_h[s] = loss + part.detach(), hf.grad
    return loss, grad_h, wf.grad


def check_fused_linear(loss_fn, h, w, want) -> float:
    h, w = (t.detach().clone().requires_grad_(True) for t in (h, w))
    loss = loss_fn(h, w)
    loss.backward()
    want_loss, grad_h, grad_w = want
    return _worst([max_err(loss, want_loss, scale=max(abs(float(want_loss)), 1.0)),
                   max_err(h.grad, grad_h), max_err(w.grad, grad_w)])


def _checked(name: str, check: Callable[[], float], tol: float) -> dict:
    """A row's value fields: max_err, tol and a status ("ok", "wrong: ..." for ours, "differs: ..."
    for a baseline), or the status of a candidate that failed to run ("OOM", "error: ...")."""
    try:
        err = check()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"max_err": None, "tol": tol, "status": "OOM"}
    except Exception as e:  # noqa: BLE001 - a baseline's failure is a row, not the end of the run
        return {"max_err": None, "tol": tol, "status": f"error: {e!r}"[:120]}
    status = "ok"
    if not err <= tol:  # a NaN error fails too
        status = f"{'wrong' if name == 'ours' else 'differs'}: max_err {err:.3g} > tol {tol:.3g}"
    return {"max_err": err, "tol": tol, "status": status}


def _ran(status: str) -> bool:
    return status == "ok" or status.startswith(("wrong", "differs"))


# ---- the benchmarks: check every candidate, then time each ----
def bench_logprobs(report, tokens, V, device, dtype, ceilings):
    logits = torch.randn(tokens, V, device=device, dtype=dtype)
    ids = torch.randint(0, V, (tokens,), device=device)
    floor_ms = tokens * V * logits.element_size() / (ceilings.copy_gbps * 1e9) * 1e3
    want, tol = logprobs_reference(logits, ids), TOLERANCE[dtype]["logprobs"]
    for name, fn in candidates_logprobs(device).items():
        checked = _checked(name, lambda fn=fn: check_logprobs(fn, logits, ids, want), tol)
        _row(report, "token_logprobs fwd", name, tokens, lambda fn=fn: fn(logits, ids), device,
             floor_ms, tokens * V * logits.element_size(), checked)


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
    cands, tol = candidates_grpo(device), TOLERANCE[dtype]["grpo"]
    views = {name: shifted if name == "ours" else leaf for name in cands}
    # every check before any timing: liger's and ours' timed backward write over leaf and shifted
    checked = {name: _checked(name, lambda fn=fn, x=views[name]: check_grpo(fn, x, inputs), tol)
               for name, fn in cands.items()}
    for name, fn in cands.items():
        def step(fn=fn, x=views[name]):  # liger and ours write the gradient over x (in place)
            x.grad = None
            fn(x, *inputs[1:]).backward()
        _row(report, "grpo_loss fwd+bwd", name, tokens, step, device, floor_ms, moved,
             checked[name])


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

    losses = {"ours": lambda h_, w_: rlpt_kernels.grpo_loss_from_hidden(
        h_, w_, ids, adv, mask, loss_type="dapo")[0]}
    if device == "cuda" and HAS_LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
        losses["liger fused-linear"] = lambda h_, w_: liger(h_, w_, ids, mask, adv)[0]
    want, tol = fused_linear_reference(h, w, ids, adv, mask), TOLERANCE[dtype]["fused_linear"]
    checked = {name: _checked(name, lambda fn=fn: check_fused_linear(fn, h, w, want), tol)
               for name, fn in losses.items()}
    del want  # grad_h and grad_w in fp32: 3 GB at 64K tokens, V 151936, H 3584

    def step(loss_fn):
        h.grad = w.grad = None
        loss_fn(h, w).backward()
    # bare matmuls compute no loss: no value to check
    _row(report, "fused-linear grpo fwd+bwd", "bare matmuls", tokens, bare, device, floor_ms, None,
         {"max_err": None, "tol": None, "status": "ok"})
    for name, fn in losses.items():
        _row(report, "fused-linear grpo fwd+bwd", name, tokens, lambda fn=fn: step(fn), device,
             floor_ms, None, checked[name])


def _row(report, op, name, tokens, fn, device, floor_ms, bytes_moved, checked: dict):
    head = {"op": op, "impl": name, "tokens": tokens, **checked}
    if not _ran(checked["status"]):  # the check could not run it: timing would fail alike
        report.rows.append(head)
        print(f"  {op} / {name} @ {tokens}: {checked['status']}", flush=True)
        return
    try:
        t = time_fn(fn, device, warmup=2, repeat=10 if device == "cuda" else 3)
        peak = peak_memory(fn, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        report.rows.append({**head, "status": "OOM"})
        return
    except Exception as e:  # noqa: BLE001 - a baseline's failure is a row, not the end of the run
        report.rows.append({**head, "status": f"error: {e!r}"[:120]})
        print(f"  {op} / {name} @ {tokens}: {e!r}", flush=True)
        return
    row = {**head, **t.as_dict(),
           "floor_ms": floor_ms, "pct_of_floor": 100 * floor_ms / t.median,
           "peak_gib": None if peak is None else peak / 2**30}
    if bytes_moved is not None:
        row["gbps"] = bytes_moved / (t.median * 1e-3) / 1e9
    report.rows.append(row)
    print(f"  {op} / {name} @ {tokens}: {t.median:.3f} ms, {row['status']}", flush=True)  # progress


def summarize(rows: list[dict]) -> dict:
    """values_ok (no "ours" row wrong or raising), then the goals as ratios (only where both sides were
    measured, and ours matched: a wrong kernel's speed means nothing)."""
    def med(op, impl, tokens):
        for r in rows:
            if (r["op"], r["impl"], r["tokens"]) == (op, impl, tokens) and "median_ms" in r \
                    and (r["status"] == "ok" or r["status"].startswith("differs")):
                return r
        return None

    # ours raising is as bad as ours wrong (an OOM is a size, not a defect)
    wrong = [r for r in rows if r["impl"] == "ours" and r["status"].startswith(("wrong", "error"))]
    out = {"values_ok": not wrong}
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
                        "pct_of_floor", "peak_gib", "max_err", "tol", "status"])
    summary = summarize(report.rows)
    if not summary["values_ok"]:
        print("VALUES WRONG: ours disagrees with the reference or raised (rows marked wrong or error): exit 1")
    return report.finish(summary)


if __name__ == "__main__":
    # after the table and the record: a wrong kernel's figures are kept, and the run still fails
    sys.exit(0 if main()["summary"]["values_ok"] else 1)
