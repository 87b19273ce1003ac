"""Tiny checkpoint, tiny synthetic world and a small config shared by the trainer tests."""
from pathlib import Path

import pytest

from rlpt_fast import synthetic
from rlpt_fast.testing import write_tiny_checkpoint
from rlpt_fast.train.config import load_config

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> synthetic.WorldFiles:
    return synthetic.write_world(synthetic.make_world(0, n_concepts=4, n_scenes=8),
                                 tmp_path_factory.mktemp("world"))


def small_overrides(ckpt: Path, world, out: Path) -> list[str]:
    """A run that takes about a second per step on 2 CPU cores."""
    return [f"--model.path={ckpt}", f"--data.files=['{world.rows}']", f"--train.output_dir={out}",
            "--grpo.num_generations=4", "--grpo.max_new_tokens=8", "--lora.r=8", "--lora.alpha=16",
            "--optim.lr=5e-3", "--train.progress=false", "--train.plots=false",
            "--grpo.reward_fn=toy_rewards:length_parity"]


@pytest.fixture
def make_config(ckpt, world, tmp_path, monkeypatch):
    """make_config(*extra_overrides) -> TrainConfig writing under tmp_path/run."""
    monkeypatch.syspath_prepend(str(HERE))  # toy_rewards

    def make(*extra: str):
        return load_config(None, small_overrides(ckpt, world, tmp_path / "run") + list(extra))
    return make
