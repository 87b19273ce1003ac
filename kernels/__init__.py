"""rlpt_kernels: fused Triton kernels for the GRPO loss path and the decoder's small inference
ops, importable on their own.

    token_logprobs(logits, token_ids, temperature=1.0)
    token_logprobs_from_hidden(hidden, weight, token_ids, temperature=1.0)
    grpo_loss(logits, token_ids, advantages, mask, *, old_logp=None, ref_logp=None, beta=0.0,
              eps_low=0.2, eps_high=0.2, temperature=1.0, kl="k3", loss_type="grpo",
              max_completion_length=None) -> (loss, {"kl": ..., "clip_ratio": ...})
    grpo_loss_from_hidden(hidden, weight, token_ids, advantages, mask, **same)
    group_advantages(rewards, group_size, *, scale="group", eps=1e-4)
    rms_norm(x, weight, eps); add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)
    silu_mul(gate, up); rotary(q, k, cos, signed_sin) -> (q', k')   (inference only: no autograd)

Each public function picks its backend from its first tensor argument (backend.py): Triton on
CUDA tensors, the pure-torch reference (rlpt_kernels.reference) on CPU tensors. The Triton
implementations are also importable directly from their modules (tests run them on CPU in
Triton's interpreter).
"""
from . import reference
from .backend import dispatch
from .decode_ops import add_rms_norm as _add_rms_norm_triton
from .decode_ops import rms_norm as _rms_norm_triton
from .decode_ops import rotary as _rotary_triton
from .decode_ops import silu_mul as _silu_mul_triton
from .fused_linear import grpo_loss_from_hidden as _grpo_loss_from_hidden_triton
from .fused_linear import token_logprobs_from_hidden as _token_logprobs_from_hidden_triton
from .group_advantages import group_advantages as _group_advantages_triton
from .grpo_loss import grpo_loss as _grpo_loss_triton
from .token_logprobs import token_logprobs as _token_logprobs_triton

token_logprobs = dispatch(_token_logprobs_triton, reference.token_logprobs)
token_logprobs_from_hidden = dispatch(_token_logprobs_from_hidden_triton,
                                      reference.token_logprobs_from_hidden)
grpo_loss = dispatch(_grpo_loss_triton, reference.grpo_loss)
grpo_loss_from_hidden = dispatch(_grpo_loss_from_hidden_triton, reference.grpo_loss_from_hidden)
group_advantages = dispatch(_group_advantages_triton, reference.group_advantages)
rms_norm = dispatch(_rms_norm_triton, reference.rms_norm)
add_rms_norm = dispatch(_add_rms_norm_triton, reference.add_rms_norm)
silu_mul = dispatch(_silu_mul_triton, reference.silu_mul)
rotary = dispatch(_rotary_triton, reference.rotary)

__all__ = ["token_logprobs", "token_logprobs_from_hidden", "grpo_loss", "grpo_loss_from_hidden",
           "group_advantages", "rms_norm", "add_rms_norm", "silu_mul", "rotary", "reference"]
