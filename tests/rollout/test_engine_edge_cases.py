"""Engine edge cases on the contract-only mock model: a failed generate call leaves nothing behind,
images side by side are told apart by the prefix cache, and bad input is refused up front with
an error that names the request and the field."""
import pytest
import torch
from rollout_mock_model import MockModel
from rollout_helpers import naive_greedy

from rlpt_fast.rollout import Engine, Request, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return MockModel().eval()


def test_failed_generate_leaves_no_sequence_behind(model):
    engine = Engine(model, num_blocks=8, block_size=4, max_model_len=64)
    ok = Request([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="request 1: .* 15 blocks but the cache has only 8"):
        engine.generate([ok, Request(list(range(1, 40)))], SamplingParams(max_tokens=20, **GREEDY))
    [[out]] = engine.generate([ok], SamplingParams(max_tokens=3, **GREEDY))
    assert out.token_ids == naive_greedy(model, torch.tensor(ok.input_ids), None, None, 3)
    assert engine.scheduler.is_finished() and engine.block_manager.num_free_blocks == 8


def test_image_tokens_that_do_not_match_the_grid_name_the_request(model):
    engine = Engine(model, num_blocks=16, block_size=4)
    img = model.config.image_token_id
    bad = Request([1, 2, img, img, 3], torch.randn(12, model.config.patch_dim), torch.tensor([[1, 2, 6]]))
    with pytest.raises(ValueError, match="request 1: 2 image tokens but its images give 3 embeddings"):
        engine.generate([Request([4, 5, 6]), bad], SamplingParams(max_tokens=4, **GREEDY))
    assert engine.scheduler.is_finished() and engine.block_manager.num_free_blocks == 16


def test_error_in_a_step_frees_the_cache(model, monkeypatch):
    engine = Engine(model, num_blocks=16, block_size=4)
    run, calls = engine.runner.run, []

    def failing_run(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", failing_run)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([Request([4, 5, 6]), Request([7, 8])], SamplingParams(n=3, max_tokens=6, **GREEDY))
    assert engine.scheduler.is_finished() and engine.block_manager.num_free_blocks == 16
    monkeypatch.undo()
    [[out]] = engine.generate([Request([4, 5, 6])], SamplingParams(max_tokens=2, **GREEDY))
    assert out.token_ids == naive_greedy(model, torch.tensor([4, 5, 6]), None, None, 2)


def test_prefix_cache_tells_adjacent_images_apart(model):
    """Two images with no token between them: each keeps its own digest, so a prompt whose second
    image differs does not reuse the first prompt's K/V for it."""
    img, gen = model.config.image_token_id, torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([5, 6, 7, 8]), torch.full((8,), img), torch.tensor([9, 10, 11])])
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])  # 16 patches = 4 tokens each (mock: 4 patches a token)
    a, b = (torch.randn(16, model.config.patch_dim, generator=gen) for _ in range(2))
    c = torch.randn(16, model.config.patch_dim, generator=gen)
    engine = Engine(model, num_blocks=64, block_size=4, enable_prefix_caching=True,
                    prefix_cache_across_calls=True)
    params = SamplingParams(max_tokens=4, **GREEDY)
    engine.generate([Request(ids, torch.cat([a, b]), grid)], params)
    [[out]] = engine.generate([Request(ids, torch.cat([a, c]), grid)], params)
    # blocks: text, image a, image c, text: only the first two may come from the cache
    assert engine.stats["prefix_cache_hit_tokens"] == 8
    fresh = Engine(model, num_blocks=64, block_size=4)
    [[want]] = fresh.generate([Request(ids, torch.cat([a, c]), grid)], params)
    assert out.token_ids == want.token_ids
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


def test_request_refuses_bad_token_ids_and_images():
    with pytest.raises(ValueError, match="Request.input_ids must hold integers, got torch.float32"):
        Request(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="Request.input_ids must hold integers"):
        Request([1, 2.5])
    with pytest.raises(ValueError, match=r"Request.input_ids must be >= 0, got -2 at index 1"):
        Request([1, -2, 3])
    with pytest.raises(ValueError, match=r"Request.pixel_values must be \(P, patch_dim\)"):
        Request([1, 2], torch.randn(4), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="Request.image_grid_thw must hold integers, got torch.float32"):
        Request([1, 2], torch.randn(4, 6), torch.tensor([[1.0, 2.0, 2.0]]))


def test_engine_refuses_token_ids_past_the_vocabulary(model):
    engine = Engine(model, num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="request 1: token id 64 at index 2 is not below vocab_size 64"):
        engine.generate([Request([1]), Request([1, 2, 64])], SamplingParams(max_tokens=2))
    assert engine.scheduler.is_finished() and engine.block_manager.num_free_blocks == 16


def test_generate_arguments_are_checked(model):
    engine = Engine(model, num_blocks=16, block_size=4)
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="1 requests but 0 SamplingParams"):
        engine.generate([Request([1])], [])
    with pytest.raises(TypeError, match=r"generate: requests\[1\] must be a Request, got list"):
        engine.generate([Request([1]), [1, 2]], SamplingParams())
    with pytest.raises(TypeError, match=r"generate: params\[0\] must be a SamplingParams, got dict"):
        engine.generate([Request([1])], [dict(n=2)])
    # any iterable of requests, a tuple of params
    [[a], [b]] = engine.generate((r for r in [Request([1]), Request([2])]), (SamplingParams(max_tokens=1),) * 2)
    assert len(a.token_ids) == len(b.token_ids) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "SamplingParams.temperature must be >= 0"),
    (dict(n=2.5), "SamplingParams.n must be an integer"),
    (dict(top_k=1.5), "SamplingParams.top_k must be an integer"),
    (dict(max_tokens=-3), "SamplingParams.max_tokens must be >= 1, got -3"),
    (dict(seed=-1), r"SamplingParams.seed must be in \[0, 2\*\*64\)"),
    (dict(seed=2**64), r"SamplingParams.seed must be in \[0, 2\*\*64\)"),
    (dict(stop_token_ids=5), "SamplingParams.stop_token_ids must be a sequence of token ids"),
])
def test_sampling_params_name_the_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_seed_at_the_top_of_its_range_samples(model):
    engine = Engine(model, num_blocks=16, block_size=4)
    params = SamplingParams(n=2, max_tokens=3, seed=2**64 - 1, ignore_eos=True)
    [[a, b]] = engine.generate([Request([1, 2, 3])], params)
    [[c, d]] = engine.generate([Request([1, 2, 3])], params)
    assert (a.token_ids, b.token_ids) == (c.token_ids, d.token_ids) and len(a.token_ids) == 3


def test_prefix_cache_lives_for_one_call_unless_asked_to_outlive_it():
    """An optimizer step changes the K/V a prompt makes, and fused AdamW updates the weights without
    bumping a version counter, so the engine cannot see it: by default cached prompt blocks are
    dropped at every call; across calls only on request, with an explicit reset after an update."""
    model = MockModel(seed=2).eval()
    ids = torch.arange(1, 15)
    params = SamplingParams(max_tokens=4, **GREEDY)
    per_call = Engine(model, num_blocks=64, block_size=4, enable_prefix_caching=True)
    across = Engine(model, num_blocks=64, block_size=4, enable_prefix_caching=True,
                    prefix_cache_across_calls=True)
    for engine in (per_call, across):
        engine.generate([Request(ids)], params)
        engine.generate([Request(ids)], params)
    assert per_call.stats["prefix_cache_hit_tokens"] == 0
    assert across.stats["prefix_cache_hit_tokens"] == 12  # same weights: the cache serves
    params_before = [p._version for p in model.parameters()]
    model.qkv.weight.grad = torch.randn_like(model.qkv.weight)
    torch.optim.AdamW([model.qkv.weight], lr=0.5, fused=True).step()
    assert [p._version for p in model.parameters()] == params_before  # invisible to the engine
    [[want]] = Engine(model, num_blocks=64, block_size=4).generate([Request(ids)], params)
    [[out]] = per_call.generate([Request(ids)], params)
    across.reset_prefix_cache()
    [[out_across]] = across.generate([Request(ids)], params)
    assert across.stats["prefix_cache_hit_tokens"] == 12  # nothing served after the reset
    for got in (out, out_across):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(num_blocks=64), dict(num_blocks=3, enable_prefix_caching=True)])
def test_group_that_ends_at_its_first_token(model, kw):
    """max_tokens=1, or a stop token drawn first: the forked samples finish in the prefill step."""
    engine = Engine(model, block_size=4, **kw)
    ids = torch.tensor([3, 1, 4, 1, 5, 9])
    first = naive_greedy(model, ids, None, None, 1)[0]
    params = [SamplingParams(n=3, max_tokens=1, seed=5),
              SamplingParams(n=2, temperature=0, max_tokens=4, stop_token_ids=[first])]
    outs = engine.generate([Request(ids), Request(ids)], params)
    assert [len(c.token_ids) for c in outs[0]] == [1, 1, 1] and {c.finish_reason for c in outs[0]} == {"length"}
    assert [(c.token_ids, c.finish_reason) for c in outs[1]] == [([first], "stop")] * 2
    assert engine.stats["decode_tokens"] == 0 and engine.block_manager.num_free_blocks == engine.num_blocks
