"""The one-launch sampler (sampler_triton.py) against sampler.sample: the same tokens and log-probs
for the same uniforms (in Triton's interpreter on CPU, fp32; in bf16 at Qwen's vocabulary on the
device), draws at exact quantiles matching the distribution, no zero-mass token ever drawn,
greedy rows, and the fallback for top-k / top-p."""
import pytest
import torch

from rlpt_fast.launch_count import count_launches
from rlpt_fast.rollout.sampler import SamplingTensors, sample
from rlpt_fast.rollout.sampler_triton import sample_triton


def _tensors(temperatures, u, top_k=0, top_p=1.0, device="cpu"):
    """Rows' sampling tensors with these uniforms, given as a column of a wider table (strided), as
    RowParams.at hands them to the sampler in eager steps."""
    st = SamplingTensors.from_rows([(t, top_k, top_p, 0, 0, i) for i, t in enumerate(temperatures)], device)
    table = torch.zeros(len(temperatures), 3, dtype=torch.float32, device=device)
    table[:, 1] = torch.as_tensor(u, dtype=torch.float32, device=device)
    st.u = table[:, 1]
    return st


@pytest.mark.parametrize("v", [37, 1000, 9000])  # one block, one partial block, three blocks of 4096
def test_same_tokens_and_logprobs_as_the_torch_sampler(v, device):
    gen = torch.Generator().manual_seed(v)
    temps = [1.0, 0.0, 0.7, 1.3, 1.0, 0.0, 2.0, 1.0, 0.5]
    logits = (torch.randn(len(temps), v, generator=gen) * 3).to(device)
    logits[1, 5] = logits[1, 17] = logits[1].max() + 1  # a greedy tie: the first index wins
    st = _tensors(temps, torch.rand(len(temps), generator=gen), device=device)
    tokens, logprobs = sample_triton(logits, st)
    want_tokens, want_logprobs = sample(logits, st)
    assert torch.equal(tokens, want_tokens) and tokens[1] == 5
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_at_exact_quantiles_follow_the_distribution(temperature, device):
    """u on a grid of R quantiles: each token is drawn round(R * p) times, give or take one."""
    logits = torch.tensor([2.0, 1.5, -1.0, 1.0, 0.2, -3.0], device=device)
    r = 500
    u = (torch.arange(r, dtype=torch.float64) + 0.5) / r
    tokens, logprobs = sample_triton(logits.expand(r, -1).contiguous(), _tensors([temperature] * r, u, device=device))
    p = (logits.double().cpu() / temperature).softmax(-1)
    counts = torch.bincount(tokens.cpu(), minlength=6)
    assert ((counts - r * p).abs() <= 1.0 + 1e-9).all(), (counts, r * p)
    torch.testing.assert_close(logprobs.double().cpu(), p.log()[tokens.cpu()], rtol=1e-5, atol=1e-5)


def test_strided_rows_ties_across_blocks_and_a_masked_first_block(device):
    """Logits as a view of a wider tensor, temperatures as a strided column, a greedy tie between
    two blocks (the first index wins), and a row whose first block of 4096 is all -inf."""
    gen = torch.Generator().manual_seed(4)
    v = 9000
    wide = (torch.randn(4, v + 100, generator=gen) * 2).to(device)
    logits = wide[:, :v]
    logits[0, 100] = logits[0, 5000] = logits[0].max() + 1
    logits[2, :4096] = float("-inf")
    st = _tensors([0.0, 1.0, 1.0, 0.7], torch.rand(4, generator=gen), device=device)
    temps = torch.zeros(4, 2, device=device)
    temps[:, 0] = st.temperature
    st.temperature = temps[:, 0]
    tokens, logprobs = sample_triton(logits, st)
    want_tokens, want_logprobs = sample(logits, st)
    assert tokens[0] == 100 and torch.equal(tokens, want_tokens)
    assert torch.isfinite(logprobs).all()
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)


def test_never_draws_a_token_without_mass(device):
    """The top uniform (and u = 1, which the hash never makes) ends in the last token with mass."""
    logits = torch.full((4, 300), float("-inf"), device=device)
    logits[:, :7] = torch.tensor([0.5, 3.0, 1.0, -2.0, 0.0, 2.5, 1.5], device=device)
    st = _tensors([1.0, 1.0, 0.0, 1.0], [1.0 - 2.0 ** -24, 2.0 ** -25, 0.5, 1.0], device=device)
    tokens, logprobs = sample_triton(logits, st)
    assert tokens.tolist() == [6, 0, 1, 6]
    assert torch.isfinite(logprobs).all()


def test_filtered_batches_take_the_torch_sampler(device):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)).to(device)
    st = _tensors([1.0, 0.8, 0.0, 1.0], [0.3, 0.9, 0.5, 0.01], top_k=5, top_p=0.9, device=device)
    got, want = sample_triton(logits, st), sample(logits, st)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_one_launch(device):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(2)).to(device)
    st = _tensors([1.0] * 6, [0.5] * 6, device=device)
    sample_triton(logits, st)  # compiled once
    assert count_launches(lambda: sample_triton(logits, st)) == 1


@pytest.mark.gpu
def test_bf16_at_qwen_vocabulary_matches_the_torch_sampler():
    """Batch 128 of bf16 logits at V = 151,936, temperature 1: every token equal but for draws
    within rounding of a boundary (at most 2 of 128), log-probs within fp32 rounding."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(128, 151936, generator=gen) * 4).to("cuda", torch.bfloat16)
    st = _tensors([1.0] * 120 + [0.0] * 8, torch.rand(128, generator=gen), device="cuda")
    tokens, logprobs = sample_triton(logits, st)
    want_tokens, want_logprobs = sample(logits, st)
    same = tokens == want_tokens
    assert int((~same).sum()) <= 2 and bool(same[120:].all())
    torch.testing.assert_close(logprobs[same], want_logprobs[same], rtol=1e-4, atol=1e-4)
