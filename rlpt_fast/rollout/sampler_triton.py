"""The sampler of sampler.py in one Triton launch, for batches without top-k / top-p (the recipe
samples at temperature 1, top-p 1).

The torch path turns the (R, V) logits into float32, log-softmax, exp and a cumulative sum: at
batch 128 and Qwen's 151,936-token vocabulary that is ~0.6 GB of memory traffic and ~10 kernels
per decode step, about what one decoder layer costs. Here each row is one program that reads its
logits twice and writes two numbers:
    pass 1: max m and s = sum exp(x/T - m) (online), and the first argmax;
    pass 2: the same terms exp(x/T - m) summed block by block until the running sum exceeds u * s:
            the drawn token, as the inverse CDF over the vocabulary in its natural order
            (sampler.py's draw, with the same uniform u per row).
The log-prob is x_tok/T - (m + log s), the log-softmax of the scaled logits; greedy rows
(T = 0) take the first argmax and the plain log-softmax at T = 1, as sampler.sample does. The
cumulative sums are rounded in another order than torch's cumsum, so a draw that falls within
rounding of a boundary between two tokens may pick the other one: each path is deterministic and
follows the same distribution; they need not agree bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlpt_fast.rollout.sampler import SamplingTensors, sample


@triton.jit
def _sample_kernel(Logits, stride_r, V, Temperature, stride_t, U, stride_u, Tokens, Logprobs, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_r
    t = tl.load(Temperature + row * stride_t)
    greedy = t == 0.0
    t = tl.where(greedy, 1.0, t)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)  # raw logits: greedy's argmax
    best_idx = tl.zeros((), tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        block_best = tl.max(x, 0)
        block_idx = tl.argmax(x, 0, tie_break_left=True).to(tl.int64) + v0
        best_idx = tl.where(block_best > best, block_idx, best_idx)  # strictly: the first max wins
        best = tl.maximum(best, block_best)
        scaled = x / t
        m_new = tl.maximum(m, tl.max(scaled, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf - -inf) is NaN
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(scaled - m_safe), 0)
        m = m_new
    target = tl.load(U + row * stride_u) * s
    running = tl.zeros((), tl.float32)
    token = tl.full((), -1, tl.int64)
    last = tl.zeros((), tl.int64)  # the last token with mass: if rounding leaves the target unreached
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        valid = cols < V
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.where(valid, tl.exp(x / t - m), 0.0)
        cdf = running + tl.cumsum(p, 0)
        hit = tl.min(tl.where((cdf > target) & (p > 0), cols, V), 0).to(tl.int64)
        token = tl.where((token < 0) & (hit < V), hit, token)
        last = tl.maximum(last, tl.max(tl.where(p > 0, cols, 0), 0).to(tl.int64))
        running += tl.sum(p, 0)
    token = tl.where(token < 0, last, token)
    token = tl.where(greedy, best_idx, token)
    x_tok = tl.load(base + token).to(tl.float32)
    tl.store(Tokens + row, token)
    tl.store(Logprobs + row, x_tok / t - (m + tl.log(s)))


def sample_triton(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """sampler.sample in one launch, with its arguments and results: logits (R, V) any float
    dtype, last dim contiguous; st.temperature and st.u (R,) float32, any stride -> tokens (R,)
    int64, logprobs (R,) float32. Batches with top-k or top-p (st.filtered) take sampler.sample
    itself. No host sync: CUDA-graph safe."""
    if st.filtered or logits.stride(-1) != 1:
        return sample(logits, st)
    r, v = logits.shape
    tokens = torch.empty(r, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(r, dtype=torch.float32, device=logits.device)
    if r:
        block = min(triton.next_power_of_2(v), 4096)
        # st.u is a column of RowParams' table of uniforms in eager steps: strided, read in place
        _sample_kernel[(r,)](logits, logits.stride(0), v, st.temperature, st.temperature.stride(0), st.u,
                             st.u.stride(0), tokens, logprobs, BLOCK_V=block, num_warps=8)
    return tokens, logprobs
