"""The Qwen2 decoder: RMSNorm, GQA attention with q/k/v bias and M-RoPE, SwiGLU MLP.

Flat over tokens: hidden states are (N, H) for N concatenated tokens; the attention function
passed to `forward_hidden` owns masking, KV caching and the GQA head mapping. Module and parameter
names follow transformers 5 (`layers.{i}.self_attn.q_proj`, ...) so checkpoints and PEFT adapter
keys line up, and every projection is an nn.Linear so LoRA can wrap it. Where their weights are
packed (packed_linear.py: the engine packs them) and no gradient is needed for them, q/k/v and
gate/up each run as one GEMM on either path; otherwise each projection is called as a module.

Two ways through the layers, chosen once per forward (`use_fused_ops`):
- eager: transformers' ops one by one; the only path autograd sees (training, gradient checkpointing).
- fused: when no gradient is needed and the kernels' backend is Triton (CUDA tensors, or
  RLPT_KERNELS_BACKEND=triton), the small ops run as rlpt_kernels' one-launch kernels: a layer
  takes (its input before the residual add, the residual stream) and returns the same pair for
  the next one, so each residual add shares a launch with the norm that follows it (vLLM's
  layout); rotary for q and k is one launch, SiLU * up one more. A decode step at batch 128 is
  launch-bound, so the ~35 kernels per layer matter, not their bytes. Each layer still touches
  only its own weights (FSDP gathers one block at a time).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import rlpt_kernels
from rlpt_kernels.backend import backend_for

from .attention import AttentionFn
from .config import ModelConfig
from .packed_linear import PackedProjections, project
from .rope import apply_rotary_tables, mrope_cos_sin, rotary_tables


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 then cast back (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same ops in one call (a decode step runs five norms of a few rows each)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one launch; residual None: (norm(x), x)."""
        if residual is None:
            return rlpt_kernels.rms_norm(x, self.weight, self.eps), x
        return rlpt_kernels.add_rms_norm(x, residual, self.weight, self.eps)


class SelfAttention(PackedProjections):
    PACKED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("o_proj",))  # o_proj alone: for LoRA (packed_linear.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionFn,
                layer_idx: int, fused: bool = False) -> torch.Tensor:
        """cos, sin: rope.rotary_tables (N, 1, D). fused: q and k rotated by one kernel, or by the
        attention function's K/V store where it offers that (`fuses_rotary`, attention.py)."""
        n = x.shape[0]
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))  # views of one GEMM's output when packed
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if fused and getattr(attn, "fuses_rotary", False):
            out = attn(layer_idx, q, k, v, rotary=(cos, sin))  # rotated as K/V are cached (one launch)
        else:
            if fused:
                q, k = rlpt_kernels.rotary(q, k, cos, sin)
            else:
                q, k = apply_rotary_tables(q, cos, sin), apply_rotary_tables(k, cos, sin)
            out = attn(layer_idx, q, k, v)  # (N, Hq, D)
        return project(out.reshape(n, self.num_heads * self.head_dim), (self.o_proj,))[0]


class MLP(PackedProjections):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    PACKED_PROJECTIONS = (("gate_proj", "up_proj"), ("down_proj",))

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        return project(rlpt_kernels.silu_mul(gate, up) if fused else F.silu(gate) * up, (self.down_proj,))[0]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = SelfAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionFn,
                residual: torch.Tensor | None = None, fused: bool = False):
        """Eager: x (N, H) -> x + attention + MLP (N, H).

        fused (module docstring): x is the previous layer's MLP output and residual the stream
        before it (None at layer 0, where x is the embeddings); returns (this layer's MLP output,
        the stream before it), both (N, H). Called as a module either way (FSDP's hooks).
        """
        if not fused:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, self.layer_idx)
            return x + self.mlp(self.post_attention_layernorm(x))
        h, residual = self.input_layernorm.fused(x, residual)
        h, residual = self.post_attention_layernorm.fused(
            self.self_attn(h, cos, sin, attn, self.layer_idx, fused=True), residual)
        return self.mlp(h, fused=True), residual


class TextModel(nn.Module):
    """embed_tokens, layers, norm (transformers' `model.language_model`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward_hidden(self, embeds: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                       gradient_checkpointing: bool = False) -> torch.Tensor:
        """embeds (N, H), positions LongTensor (3, N) -> final-normed hidden (N, H), embeds' dtype.

        With gradient_checkpointing each layer's activations are recomputed in backward (only the
        layer inputs are kept), which needs the attention function to be deterministic.
        """
        if positions.shape != (3, embeds.shape[0]):
            raise ValueError(f"positions must be (3, {embeds.shape[0]}), got {tuple(positions.shape)}")
        cfg = self.cfg
        cos, sin = rotary_tables(*mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, embeds.dtype))
        if self.use_fused_ops(embeds):
            x, residual = embeds, None
            for layer in self.layers:
                x, residual = layer(x, cos, sin, attn, residual, fused=True)
            return self.norm.fused(x, residual)[0]
        x = embeds
        for layer in self.layers:
            if gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn)
        return self.norm(x)

    def use_fused_ops(self, embeds: torch.Tensor) -> bool:
        """Whether forward_hidden takes the fused inference path: the kernels' backend for these
        tensors is Triton, and nothing asks for a gradient (the fused kernels have no backward)."""
        if backend_for(embeds) != "triton":
            return False
        if not torch.is_grad_enabled():
            return True
        return not (embeds.requires_grad or any(p.requires_grad for p in self.parameters()))
