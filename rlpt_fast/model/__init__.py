"""Our Qwen2-VL / Qwen2.5-VL model: config parsing, checkpoint loading, flat entry points.

See /work/coord/model_contract.md (the interface) and model.py (the module tree).
"""
from .attention import AttentionFn, causal_attention
from .config import ConfigError, ModelConfig, VisionConfig, load_config
from .loader import CheckpointError, load_model
from .model import QwenVLModel

__all__ = ["AttentionFn", "CheckpointError", "ConfigError", "ModelConfig", "QwenVLModel", "VisionConfig",
           "causal_attention", "load_config", "load_model"]
