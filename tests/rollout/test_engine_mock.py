"""The engine against a model that implements only the model contract (rollout_mock_model.py): greedy
decoding equals recomputing the dense logits at every step, with images (a negative M-RoPE delta),
a cache small enough to preempt, and forked samples whose log-probs match recomputation."""
import torch
from rollout_mock_model import MockModel
from rollout_helpers import naive_greedy, recomputed_logprobs

from rlpt_fast.rollout import Engine, Request, SamplingParams


def prompts(model):
    img = model.config.image_token_id
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 59, (n,), generator=gen)
    with_image = torch.cat([text(3), torch.full((6,), img), text(4), torch.full((2,), img), text(2)])
    pixels = torch.randn(32, model.config.patch_dim, generator=gen)
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])
    return [(text(11), None, None), (with_image, pixels, grid), (text(5), None, None)]


def test_greedy_equals_dense_recomputation_with_preemption():
    model = MockModel().eval()
    ps = prompts(model)
    want = [naive_greedy(model, *p, 9) for p in ps]
    for kw in (dict(num_blocks=64, block_size=4), dict(num_blocks=9, block_size=4, max_num_batched_tokens=8)):
        engine = Engine(model, **kw)
        out = engine.generate([Request(*p) for p in ps], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
        assert [o[0].token_ids for o in out] == want
    assert engine.stats["preemptions"] > 0


def test_forked_samples_report_recomputed_logprobs():
    model = MockModel(seed=1).eval()
    p = prompts(model)[1]
    engine = Engine(model, num_blocks=64, block_size=4)
    [outs] = engine.generate([Request(*p)], SamplingParams(n=4, temperature=0.8, max_tokens=7, seed=3, ignore_eos=True))
    assert engine.stats["prefill_tokens"] == p[0].numel()
    for o in outs:
        want = recomputed_logprobs(model, *p, o.token_ids, 0.8)
        torch.testing.assert_close(torch.tensor(o.logprobs, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
