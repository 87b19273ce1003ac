"""Tiny checkpoints shared by the model tests (written once per session; a few seconds each)."""
import pytest

from rlpt_fast.testing import write_tiny_checkpoint

ARCHS = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="session", params=ARCHS)
def tiny_ckpt(request, tmp_path_factory):
    """Path of a tiny random checkpoint directory, once per architecture."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=0)
