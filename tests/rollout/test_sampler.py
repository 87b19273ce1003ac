"""Sampler: draws follow temperature / top-k / top-p distributions (statistical test on a tiny
vocabulary), reported log-probs are those of the final distribution, seeded draws reproduce
whatever the batch composition."""
import math

import numpy as np
import pytest
import torch

from rlpt_fast.rollout.sampler import AHEAD, RowParams, SamplingTensors, filter_logits, sample, uniform

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
R = 12000


def draw(temperature=1.0, top_k=0, top_p=1.0, seed=7, rows=R, logits=LOGITS):
    st = SamplingTensors.from_rows([(temperature, top_k, top_p, seed, 0, pos) for pos in range(rows)], "cpu")
    return sample(logits.expand(rows, -1).clone(), st)


def expected(temperature, top_k=0, top_p=1.0):
    p = (LOGITS.double() / temperature).softmax(-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:top_k or len(p)]] = True
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    mass = 0.0
    for i in p.argsort(descending=True).tolist():  # smallest head reaching top_p
        if mass >= top_p:
            p[i] = 0.0
        mass += p[i].item()
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.7, 0, 1.0),
                                                     (1.0, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.9)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
    want = expected(temperature, top_k, top_p)
    tokens, logprobs = draw(temperature, top_k, top_p)
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / R
    sigma = (want * (1 - want) / R).sqrt()
    assert ((freq - want).abs() <= 4.5 * sigma + 1e-12).all(), (freq, want)
    assert (freq[want == 0] == 0).all()
    torch.testing.assert_close(logprobs.double(), want.log()[tokens], atol=1e-5, rtol=1e-5)
    # chi-square over the support stays within a generous bound for its degrees of freedom
    support = want > 0
    chi2 = (((freq - want)[support] ** 2) / want[support]).sum() * R
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1))


def test_greedy_takes_argmax_and_reports_plain_logsoftmax():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    st = SamplingTensors.from_rows([(0.0, 3, 0.5, 1, 0, i) for i in range(5)], "cpu")
    tokens, logprobs = sample(logits, st)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))


def test_seeded_draws_do_not_depend_on_batch_composition():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 50, generator=gen)
    rows = [(1.0, 0, 1.0, 1234, i % 3, 10 + i) for i in range(8)]
    tok_a, lp_a = sample(logits, SamplingTensors.from_rows(rows, "cpu"))
    perm = [5, 2, 7, 0, 1, 6, 3, 4]
    # other rows with top-k force the sorted path for the batch: the plain rows must not change
    extra = torch.randn(3, 50, generator=gen)
    rows_b = [rows[i] for i in perm] + [(0.9, 5, 0.8, 99, 0, i) for i in range(3)]
    tok_b, lp_b = sample(torch.cat([logits[perm], extra]), SamplingTensors.from_rows(rows_b, "cpu"))
    assert torch.equal(tok_b[:8], tok_a[perm]) and torch.equal(lp_b[:8], lp_a[perm])
    tok_c, _ = sample(logits, SamplingTensors.from_rows([(1.0, 0, 1.0, 4321, *r[4:]) for r in rows], "cpu"))
    assert not torch.equal(tok_c, tok_a)


def test_uniforms_are_uniform_and_keyed():
    n = 50000
    keys = np.arange(n, dtype=np.uint64)
    three = np.full(n, 3, dtype=np.uint64)
    u = uniform(three, keys % np.uint64(8), keys // np.uint64(8))
    assert (u > 0).all() and (u < 1).all() and (u.astype(np.float32) < 1).all()
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / n
    assert np.abs(hist - 0.1).max() < 0.006
    assert len(set(u.tolist())) > n * 0.99
    assert np.array_equal(u, uniform(three, keys % np.uint64(8), keys // np.uint64(8)))
    big = np.full(4, 2**62 + 5, dtype=np.uint64)
    assert not np.array_equal(uniform(big, keys[:4], keys[:4]), uniform(big + np.uint64(2**40), keys[:4], keys[:4]))


def test_filter_keeps_ties_and_at_least_one_token():
    scaled = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 0.0, -1.0, -2.0]])
    out = filter_logits(scaled, torch.tensor([1, 0]), torch.tensor([1.0, 0.01]))
    assert torch.isinf(out).tolist() == [[True, False, False, True], [False, True, True, True]]


def test_mixed_greedy_and_sampled_rows_match_their_own_batches():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    rows = [(0.0, 0, 1.0, 9, 0, 5), (0.9, 4, 1.0, 9, 1, 5), (0.0, 0, 1.0, 9, 2, 5), (1.1, 0, 0.8, 9, 3, 5)]
    tok, lp = sample(logits, SamplingTensors.from_rows(rows, "cpu"))
    g_tok, g_lp = sample(logits[[0, 2]], SamplingTensors.from_rows([rows[0], rows[2]], "cpu"))
    s_tok, s_lp = sample(logits[[1, 3]], SamplingTensors.from_rows([rows[1], rows[3]], "cpu"))
    assert tok.tolist() == [g_tok[0], s_tok[0], g_tok[1], s_tok[1]]
    torch.testing.assert_close(lp, torch.stack([g_lp[0], s_lp[0], g_lp[1], s_lp[1]]))


def test_row_params_steps_give_the_uniforms_of_each_position():
    """RowParams.at serves decode steps from uniforms made ahead: the same values as `uniform` at
    every position, across the end of the table, a reordered jump and rows at different positions."""
    seeds, index = np.array([5, 5, 2**40 + 3], dtype=np.uint64), np.array([0, 1, 7], dtype=np.uint64)
    rp = RowParams.from_rows([(1.0, 0, 1.0, int(s), int(i)) for s, i in zip(seeds, index)], "cpu")
    start = np.array([10, 10, 300], dtype=np.uint64)
    for pos in [start + np.uint64(j) for j in range(AHEAD + 3)] + [start + np.uint64(2), start + np.uint64(500)]:
        got = rp.at(pos.tolist()).u.numpy()
        np.testing.assert_array_equal(got, uniform(seeds, index, pos).astype(np.float32))
