"""GRPO post-training: config, trainer, checkpoints, logging, `rlpt train`.

    from rlpt_fast.train import TrainConfig, Trainer, load_config
    trainer = Trainer(load_config("run.toml", ["--train.max_steps=10"]))
    metrics = trainer.step()      # one optimizer step: rollout, rewards, loss, update
    trainer.train()               # the whole run, with checkpoints and logs
"""
from rlpt_fast.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "Trainer", "load_config"]


def __getattr__(name: str):
    if name == "Trainer":  # lazy: the config is importable without torch
        from rlpt_fast.train.trainer import Trainer
        return Trainer
    raise AttributeError(f"module 'rlpt_fast.train' has no attribute {name!r}")
