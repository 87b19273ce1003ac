"""In-process rollout engine over a paged KV cache (see engine.py)."""
from rlpt_fast.rollout.config import EngineConfig
from rlpt_fast.rollout.engine import Engine
from rlpt_fast.rollout.params import Completion, Request, SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "SamplingParams"]
