"""An engine dropped is freed at once, by reference counting, with its KV cache: on a GPU that cache
is most of the card, and an engine kept alive in a reference cycle until the next full collection
left the next engine in the process a full card to measure (H100, 2026-11-27: "only -4001097
KV-cache blocks fit"). Collection is switched off in these tests, so a cycle shows."""
import gc
import weakref
from contextlib import contextmanager

import pytest
from rollout_helpers import load_ours, prompt

from rlpt_fast.rollout import Engine, Request, SamplingParams, cuda_graphs


@contextmanager
def no_collection():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def assert_freed_on_drop(make_engine):
    with no_collection():
        engine = make_engine()
        alive, cache = weakref.ref(engine), weakref.ref(engine.runner.kv_cache)
        del engine
        assert alive() is None, "the engine outlived its last reference (a reference cycle)"
        assert cache() is None, "the KV cache outlived its engine"


@pytest.fixture(scope="module")
def model(ckpt25):
    return load_ours(ckpt25)


def test_eager_engine_is_freed_on_drop(model):
    def make():
        engine = Engine(model, num_blocks=32, block_size=4, max_num_seqs=4, max_model_len=64)
        engine.generate([Request(*prompt(model.config, 3, [5]))], SamplingParams(n=2, max_tokens=4, seed=1))
        return engine
    assert_freed_on_drop(make)


def test_graphed_engine_is_freed_on_drop(model, monkeypatch):
    # a captured graph holds no Python reference to what it captured; neither does this stand-in
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_record", lambda self, fn: (object(), fn()))

    def make():
        engine = Engine(model, cuda_graphs=True, num_blocks=32, block_size=4, max_num_seqs=4, max_model_len=64,
                        attention_backend="torch")
        assert engine.runner.graphs is not None and engine.runner.graphs.graphs  # captured
        return engine
    assert_freed_on_drop(make)


@pytest.mark.gpu
def test_cuda_engine_is_freed_on_drop_and_the_next_one_sized_from_free_memory(ckpt25):
    gpu_model = load_ours(ckpt25).cuda()
    params = SamplingParams(n=2, max_tokens=6, seed=1, ignore_eos=True)

    def make():  # sized from free memory: most of the card
        engine = Engine(gpu_model, max_num_seqs=8, max_model_len=256)
        engine.generate([Request(*prompt(gpu_model.config, 3, [5]))], params)
        return engine
    assert_freed_on_drop(make)
    assert_freed_on_drop(make)  # sized again from the card its predecessor gave back
