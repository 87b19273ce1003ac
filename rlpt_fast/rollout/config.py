"""The engine's settings, validated once. Every default works on a CPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EngineConfig:
    """block_size: tokens per KV-cache block. num_blocks: cache size in blocks (None: measured from
    free GPU memory times gpu_memory_utilization on CUDA; on the CPU, kv_cache_bytes (default
    256 MiB) worth, capped at what max_num_seqs sequences of max_model_len can use).
    max_num_seqs: decode batch cap. max_num_batched_tokens: prefill token budget per step (longer
    prompts are chunked). max_model_len: prompt + completion cap (finish_reason "length").
    enable_prefix_caching: full prompt blocks already computed (same tokens, same images) are reused
    by later requests of the same generate call. prefix_cache_across_calls: keep them for later
    calls too; only while the weights stay fixed (evaluation), or call engine.reset_prefix_cache()
    after changing them: the engine cannot see an update (fused AdamW bumps no version counter).
    cuda_graphs: capture decode per batch-size bucket (None: on CUDA). attention_backend: "triton"
    (paged Triton kernels), "torch" (references) or "auto" (Triton on CUDA, torch elsewhere).
    cascade_decode: the samples of one prompt read its shared KV blocks once per decode step
    (cascade_attention.py) instead of once per sample. pack_projections: move each layer's q/k/v
    and gate/up weights into one tensor apiece (the same Parameters, values unchanged) so every
    gradient-free forward runs one GEMM for each group (model/packed_linear.py)."""
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int = 4096
    enable_prefix_caching: bool = False
    prefix_cache_across_calls: bool = False
    enable_chunked_prefill: bool = True
    cuda_graphs: bool | None = None
    attention_backend: Literal["auto", "triton", "torch"] = "auto"
    cascade_decode: bool = True
    pack_projections: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig.num_blocks must be >= 1 or None, got {self.num_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"EngineConfig.kv_cache_bytes must be >= 1 or None, got {self.kv_cache_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"EngineConfig.attention_backend must be auto|triton|torch, got {self.attention_backend!r}")

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
