"""rlpt-fast: GRPO post-training of Qwen2-VL / Qwen2.5-VL for personalized captioning.

The public names are imported lazily so that `import rlpt_fast` stays cheap and a user of one
part (say, the caption metrics) does not pay for the others.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "rlpt_fast.model",
    "Engine": "rlpt_fast.rollout",
    "Request": "rlpt_fast.rollout",
    "SamplingParams": "rlpt_fast.rollout",
    "Completion": "rlpt_fast.rollout",
    "Trainer": "rlpt_fast.train",
    "TrainConfig": "rlpt_fast.train",
    "load_config": "rlpt_fast.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlpt_fast' has no attribute {name!r}")
