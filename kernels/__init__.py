"""rlpt_kernels: fused Triton kernels for the GRPO loss path (work in progress)."""
