"""rlpt-fast: GRPO post-training of Qwen2-VL / Qwen2.5-VL for personalized captioning."""

__version__ = "0.1.0"
