"""Greedy output of the engine is token-for-token transformers' generate on tiny checkpoints:
text-only and multi-image prompts, a batch of prompts of different lengths, chunked prefill, and a
cache so small that sequences are preempted and recomputed."""
import pytest
import torch
from rollout_helpers import hf_greedy, load_ours, load_theirs, prompt

from rlpt_fast.rollout import Engine, Request, SamplingParams

NEW = 10


@pytest.fixture(scope="module")
def models(ckpt):
    return load_ours(ckpt), load_theirs(ckpt)


@pytest.fixture(scope="module")
def ours25(ckpt25):
    """One architecture is enough for the attention backends (the kernels do not depend on it)."""
    return load_ours(ckpt25)


def cases(cfg):
    return [prompt(cfg, 1, [13]),                                          # text only
            prompt(cfg, 2, [5, 3, 4], [[1, 4, 6], [1, 6, 4]]),             # two images
            prompt(cfg, 3, [2, 9], [[1, 4, 4]]),
            prompt(cfg, 4, [31])]


@pytest.mark.parametrize("engine_kw", [dict(), dict(num_blocks=12, block_size=4, max_num_batched_tokens=16)],
                         ids=["roomy", "tiny-cache-chunked"])
def test_greedy_matches_transformers_generate(models, engine_kw):
    ours, theirs = models
    prompts = cases(ours.config)
    want = [hf_greedy(theirs, *p, NEW) for p in prompts]
    engine = Engine(ours, **engine_kw)
    outs = engine.generate([Request(*p) for p in prompts], SamplingParams(temperature=0, max_tokens=NEW))
    got = [o[0].token_ids for o in outs]
    assert got == want
    for o, w in zip(outs, want):
        eos = w[-1] in ours.config.eos_token_ids
        assert o[0].finish_reason == ("stop" if eos else "length")
    if engine_kw:
        assert engine.stats["preemptions"] > 0
        assert engine.stats["prefill_tokens"] > sum(p[0].numel() for p in prompts)  # recomputation
    else:
        assert engine.stats["preemptions"] == 0
        assert engine.stats["prefill_tokens"] == sum(p[0].numel() for p in prompts)


@pytest.mark.parametrize("cascade", [True, False])
def test_triton_backend_in_engine_matches_torch_backend(ours25, cascade):
    ours = ours25
    prompts = cases(ours.config)[:2]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(n=3, max_tokens=6, ignore_eos=True, seed=1)]  # 3 samples share the prompt
    kw = dict(num_blocks=64, block_size=4, cascade_decode=cascade)
    ref = Engine(ours, **kw).generate([Request(*p) for p in prompts], params)
    tri = Engine(ours, attention_backend="triton", **kw).generate([Request(*p) for p in prompts], params)
    assert [[c.token_ids for c in o] for o in tri] == [[c.token_ids for c in o] for o in ref]
    for a, b in zip(tri, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


def test_cuda_graph_static_buffers_give_the_same_tokens(ours25, monkeypatch):
    """The CUDA-graph decode path with each replay replaced by a plain call of the captured
    function (CPU): static buffers, bucket padding and the cascade's static groups are exercised
    (the sampling in the graphs: test_graph_sampling.py)."""
    from rlpt_fast.rollout import cuda_graphs

    def fake_record(self, fn):  # replay: call fn again, its output into the capture's output
        out = fn()
        return type("Replay", (), {"replay": lambda _: fn() if out is None else out.copy_(fn())})(), out

    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_record", fake_record)
    ours = ours25
    prompts = cases(ours.config)[:3]
    params = [SamplingParams(n=3, max_tokens=6, ignore_eos=True, seed=2), SamplingParams(temperature=0, max_tokens=5),
              SamplingParams(n=2, max_tokens=7, ignore_eos=True, seed=3)]
    kw = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_model_len=64)
    ref = Engine(ours, **kw).generate([Request(*p) for p in prompts], params)
    graphed = Engine(ours, attention_backend="triton", cuda_graphs=True, **kw)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.buckets == [1, 2, 4, 8]
    got = graphed.generate([Request(*p) for p in prompts], params)
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in ref]
