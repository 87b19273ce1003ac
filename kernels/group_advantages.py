"""group_advantages: GRPO's per-group reward normalization, one program per group.

    a_i = (r_i - mean_g(r)) / (std + eps)
    std = unbiased std of the group ("group"), of the whole batch ("batch"), or 1 - eps ("none")
A group whose rewards are all equal gets exactly 0 (no rounding residue from the mean), and no
gradient. The backward is the exact derivative, including the std's dependence on every reward:
    dr_j = (g_j - mean_g(g)) / (s + eps) - (sum_i g_i c_i) / (s + eps)^2 * c'_j / ((n - 1) s)
with c the centered rewards, n the std's population, c'_j the reward centered on the std's own
mean, and the sum over that population (a group, or the batch with equal groups excluded).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import check_rewards

SCALE_CODES = {"none": 0, "group": 1, "batch": 2}


@triton.jit
def _load_group(r_ptr, G, BLOCK_G: tl.constexpr):
    group = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    r = tl.load(r_ptr + group * G + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(r, 0) / G
    centered = tl.where(valid, r - mean, 0.0)
    same = tl.max(tl.where(valid, r, -float("inf")), 0) == tl.min(tl.where(valid, r, float("inf")), 0)
    return group * G + offs, valid, centered, same


@triton.jit
def _group_std(centered, G):
    return tl.sqrt(tl.sum(centered * centered, 0) / tl.maximum(G - 1, 1))


@triton.jit
def _group_adv_fwd_kernel(r_ptr, out_ptr, batch_std_ptr, G, eps, SCALE: tl.constexpr,
                          BLOCK_G: tl.constexpr):
    offs, valid, centered, same = _load_group(r_ptr, G, BLOCK_G)
    adv = centered
    if SCALE == 1:
        adv = centered / (_group_std(centered, G) + eps)
    elif SCALE == 2:
        adv = centered / (tl.load(batch_std_ptr) + eps)
    tl.store(out_ptr + offs, tl.where(same, 0.0, adv), mask=valid)


@triton.jit
def _group_adv_bwd_kernel(r_ptr, grad_out_ptr, grad_in_ptr, batch_ptr, G, eps,
                          SCALE: tl.constexpr, BLOCK_G: tl.constexpr):
    offs, valid, centered, same = _load_group(r_ptr, G, BLOCK_G)
    g = tl.load(grad_out_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g_centered = tl.where(valid, g - tl.sum(g, 0) / G, 0.0)
    grad = g_centered
    if SCALE == 1:
        s = _group_std(centered, G)
        dot = tl.sum(g * centered, 0)
        dstd = tl.where(s > 0, centered / (tl.maximum(G - 1, 1) * tl.maximum(s, 1e-30)), 0.0)
        grad = g_centered / (s + eps) - dot / ((s + eps) * (s + eps)) * dstd
    elif SCALE == 2:
        # batch_ptr holds [std, batch mean, sum_i g_i c_i over unequal groups, population - 1]
        s = tl.load(batch_ptr)
        r = tl.load(r_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        dstd = tl.where(s > 0, (r - tl.load(batch_ptr + 1)) / (tl.load(batch_ptr + 3) * tl.maximum(s, 1e-30)), 0.0)
        # An equal group's own advantages are pinned to 0, but its rewards still move the std.
        own = tl.where(same, 0.0, g_centered / (s + eps))
        grad = own - tl.load(batch_ptr + 2) / ((s + eps) * (s + eps)) * dstd
        same = False
    tl.store(grad_in_ptr + offs, tl.where(same, 0.0, grad), mask=valid)


def _launch(kernel, rewards, G, *ptrs, eps, scale):
    n_groups = rewards.numel() // G
    kernel[(n_groups,)](rewards, *ptrs, G, eps, SCALE=SCALE_CODES[scale],
                        BLOCK_G=triton.next_power_of_2(G))


class _GroupAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size, scale, eps):
        r = rewards.contiguous()
        out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
        batch_std = r.float().std() if r.numel() > 1 else r.new_zeros((), dtype=torch.float32)
        _launch(_group_adv_fwd_kernel, r, group_size, out, batch_std.reshape(1), eps=eps, scale=scale)
        ctx.save_for_backward(r, out)
        ctx.group_size, ctx.scale, ctx.eps = group_size, scale, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        r, adv = ctx.saved_tensors
        G, grad_out = ctx.group_size, grad_out.float().contiguous()
        batch = _batch_terms(r, adv, grad_out, G) if ctx.scale == "batch" else r.new_zeros(4)
        grad_in = torch.empty(r.shape, dtype=torch.float32, device=r.device)
        _launch(_group_adv_bwd_kernel, r, G, grad_out, grad_in, batch, eps=ctx.eps, scale=ctx.scale)
        return grad_in.to(r.dtype), None, None, None


def _batch_terms(r: torch.Tensor, adv: torch.Tensor, g: torch.Tensor, G: int) -> torch.Tensor:
    """[std, mean, sum g_i c_i, n - 1] of the batch std (small torch reductions)."""
    rf = r.float()
    groups = rf.view(-1, G)
    unequal = (groups.amax(-1) != groups.amin(-1)).repeat_interleave(G)
    centered = (groups - groups.mean(-1, keepdim=True)).view(-1)
    dot = (g * centered * unequal).sum()
    n = rf.numel()
    return torch.stack([rf.std(), rf.mean(), dot, torch.tensor(float(max(n - 1, 1)),
                                                                device=r.device)]).float()


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages (N,) float32 from rewards (N,), N a multiple of group_size; groups contiguous.

    rewards: 1-D, any real dtype (computed in fp32) and stride, on one device.  group_size: python
    int >= 1.  scale: "group" (divide by the group's unbiased std + eps), "batch" (by the whole
    batch's) or "none" (centre only).  eps: python float added to the std.  Differentiable.
    """
    check_rewards(rewards, group_size, scale)
    return _GroupAdvantages.apply(rewards, int(group_size), scale, float(eps))
