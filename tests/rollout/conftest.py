"""Tiny checkpoints for the engine tests (built once per session)."""
import pytest
import torch

from rlpt_fast.testing import write_tiny_checkpoint


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen2_vl"])
def ckpt(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=0)


@pytest.fixture(scope="session")
def ckpt25(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q25"), "qwen2_5_vl", seed=3)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floats: a partial result read before it is written shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
