"""Sampling through the engine: n samples from one prefill, log-probs equal to the model's
recomputed ones, seeded reproducibility through batching and preemption, stop rules, and the
engine following in-place weight updates (LoRA included)."""
import pytest
import torch
from rollout_helpers import load_ours, naive_greedy, prompt, recomputed_logprobs

from rlpt_fast.model.lora import LoRAConfig, apply_lora, lora_layers
from rlpt_fast.rollout import Engine, Request, SamplingParams


@pytest.fixture(scope="module")
def model(ckpt25):
    return load_ours(ckpt25)


@pytest.fixture(scope="module")
def mm(model):
    return prompt(model.config, 11, [6, 5, 3], [[1, 4, 6], [1, 4, 4]])


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: its attention and one-launch sampler
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 20, 0.9)])
def test_n8_prefills_once_and_logprobs_match_recomputation(model, mm, temperature, top_k, top_p, backend):
    engine = Engine(model, block_size=4, attention_backend=backend)
    params = SamplingParams(n=8, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=9, seed=5)
    [outs] = engine.generate([Request(*mm)], params)
    assert len(outs) == 8
    assert engine.stats["prefill_tokens"] == mm[0].numel()  # the prompt once, not 8 times
    assert engine.stats["decode_tokens"] == sum(len(o.token_ids) - 1 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    for o in outs:
        want = recomputed_logprobs(model, *mm, o.token_ids, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(o.logprobs, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_seeded_sampling_reproduces_across_batching_and_preemption(model, mm, backend):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=42, ignore_eos=True)
    first = Engine(model, attention_backend=backend).generate([Request(*mm)], params)[0]
    other = Request(*prompt(model.config, 12, [20]))
    small = Engine(model, num_blocks=10, block_size=4, attention_backend=backend)  # forces preemption
    again = small.generate([other, Request(*mm)], [SamplingParams(n=3, max_tokens=12, ignore_eos=True), params])[1]
    assert small.stats["preemptions"] > 0
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    for a, b in zip(again, first):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    different = Engine(model, attention_backend=backend).generate(
        [Request(*mm)], SamplingParams(n=4, max_tokens=12, seed=43, ignore_eos=True))[0]
    assert [o.token_ids for o in different] != [o.token_ids for o in first]


def test_unseeded_sampling_follows_torch_manual_seed(model, mm):
    engine = Engine(model, num_blocks=64)
    params = SamplingParams(n=2, max_tokens=6, ignore_eos=True)
    torch.manual_seed(0)
    a = engine.generate([Request(*mm)], params)
    torch.manual_seed(0)
    b = engine.generate([Request(*mm)], params)
    assert [o.token_ids for o in a[0]] == [o.token_ids for o in b[0]]


def test_stop_tokens_max_tokens_and_finish_reasons(model, mm):
    engine = Engine(model, num_blocks=64)
    greedy = naive_greedy(model, *mm, 8)
    stop = greedy[3]
    first = greedy.index(stop)
    [[out]] = engine.generate([Request(*mm)], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,)))
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop"
    [[out]] = engine.generate([Request(*mm)], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert out.token_ids == greedy[:3] and out.finish_reason == "length" and len(out.logprobs) == 3
    short = Engine(model, num_blocks=64, max_model_len=mm[0].numel() + 2)
    [[out]] = short.generate([Request(*mm)], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out.token_ids == greedy[:2] and out.finish_reason == "length"


def test_bad_arguments_name_the_problem(model, mm):
    engine = Engine(model, num_blocks=64, max_model_len=16)
    with pytest.raises(ValueError, match="request 0: prompt of"):
        engine.generate([Request(*mm)], SamplingParams())
    with pytest.raises(ValueError, match="2 requests but 1 SamplingParams"):
        engine.generate([Request([1]), Request([2])], [SamplingParams()])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(model, attention_backend="cuda")


def test_prefix_cache_reuses_prompt_blocks_only_for_the_same_images(model, mm):
    engine = Engine(model, num_blocks=128, block_size=4, enable_prefix_caching=True,
                    prefix_cache_across_calls=True)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    [[a]] = engine.generate([Request(*mm)], params)
    [[b]] = engine.generate([Request(*mm)], params)
    hits = engine.stats["prefix_cache_hit_tokens"]
    assert b.token_ids == a.token_ids and hits >= mm[0].numel() - 4
    ids, pixels, grid = mm
    [[c]] = engine.generate([Request(ids, pixels + 1.0, grid)], params)
    first_image = int((ids == model.config.image_token_id).nonzero()[0])
    assert engine.stats["prefix_cache_hit_tokens"] - hits <= first_image  # only the text before it
    assert c.token_ids == naive_greedy(model, ids, pixels + 1.0, grid, 5)


def test_engine_follows_in_place_weight_updates_including_lora(ckpt25, mm):
    model = load_ours(ckpt25)
    engine = Engine(model, num_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = engine.generate([Request(*mm)], params)[0][0].token_ids
    with torch.no_grad():  # an "optimizer step" on a base weight: make token 7 win everywhere
        model.lm_head.weight[7] += 50 * model.lm_head.weight[7].sign()
    assert naive_greedy(model, *mm, 6) == engine.generate([Request(*mm)], params)[0][0].token_ids != before

    model = load_ours(ckpt25)
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.5))  # dropout must be off while generating
    model.train()
    engine = Engine(model, num_blocks=64)
    base = engine.generate([Request(*mm)], params)[0][0].token_ids
    assert model.training
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen))
    model.eval()
    want = naive_greedy(model, *mm, 6)
    model.train()
    got = engine.generate([Request(*mm)], params)[0][0].token_ids
    assert got == want != base


def test_cpu_cache_size_follows_budget_and_cap(model):
    per_block = Engine(model, num_blocks=1).runner.block_bytes
    cfg = model.config
    assert per_block == 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert Engine(model, kv_cache_bytes=50 * per_block + 7).num_blocks == 50
    assert Engine(model, max_num_seqs=2, max_model_len=64).num_blocks == 2 * 4 + 1  # all it could ever use
