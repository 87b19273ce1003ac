"""Shared-prefix group packing: layout, mask and attention against brute force, then the packed
training forward against G separate forwards of the real model (log-probs and gradients)."""
import pytest
import torch

from rlpt_fast.model.packing import Group, dense_mask, pack_groups, packed_attention

DELTA = 3  # a non-zero M-RoPE delta, so positions that forget it are caught


class RopeStub:
    """Stands in for the model where only rope_positions matters: text positions plus DELTA."""

    def rope_positions(self, ids, grid):
        t = ids.numel()
        return (torch.arange(t) * 2).expand(3, t).clone(), DELTA  # prompt positions: 0, 2, 4, ...


def _groups() -> list[Group]:
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 50, (n,), generator=gen)  # noqa: E731
    return [Group(ids(5), [ids(3), ids(1), ids(4)]), Group(ids(7), [ids(2), ids(6)])]


def _token_roles(groups, share_prompt):
    """Brute force: for each packed row, (sequence, completion or None, offset in its segment)."""
    roles, s = [], 0
    for g in groups:
        members = [list(range(len(g.completions)))] if share_prompt else [[k] for k in range(len(g.completions))]
        for ks in members:
            roles += [(s, None, i) for i in range(g.prompt_ids.numel())]
            for k in ks:
                roles += [(s, k, j) for j in range(g.completions[k].numel() - 1)]
            s += 1
    return roles


@pytest.mark.parametrize("share_prompt", [True, False])
def test_mask_matches_brute_force(share_prompt):
    groups = _groups()
    packed = pack_groups(RopeStub(), groups, share_prompt=share_prompt)
    roles = _token_roles(groups, share_prompt)
    n = len(roles)
    expected = torch.zeros(n, n, dtype=torch.bool)
    for q, (sq, kq, iq) in enumerate(roles):
        for kv, (skv, kkv, ikv) in enumerate(roles):
            if sq != skv:
                continue
            if kkv is None:  # a prompt key: every completion sees all of it, the prompt causally
                expected[q, kv] = kq is not None or ikv <= iq
            else:
                expected[q, kv] = kkv == kq and ikv <= iq
    assert torch.equal(dense_mask(packed), expected)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_layout_positions_and_predictors(share_prompt):
    groups = _groups()
    packed = pack_groups(RopeStub(), groups, share_prompt=share_prompt)
    roles = _token_roles(groups, share_prompt)
    assert packed.input_ids.numel() == len(roles)
    # every target is predicted by the row holding the previous token of [prompt; completion]
    t = 0
    for gi, g in enumerate(groups):
        p = g.prompt_ids.numel()
        full = [torch.cat([g.prompt_ids, c]) for c in g.completions]
        for k, c in enumerate(g.completions):
            for j in range(c.numel()):
                row = int(packed.predict_index[t])
                seq, comp, off = roles[row]
                assert packed.target_ids[t] == c[j]
                assert packed.input_ids[row] == full[k][p + j - 1]
                if j == 0:
                    assert comp is None and off == p - 1
                else:
                    assert comp == k and off == j - 1
                    assert packed.positions[:, row].tolist() == [p + j - 1 + DELTA] * 3
                t += 1
    assert t == packed.target_ids.numel() == sum(packed.completion_lengths)


def _reference_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_matches_brute_force(backend):
    packed = pack_groups(RopeStub(), _groups())
    n = packed.input_ids.numel()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    expected = _reference_attention(q, k, v, dense_mask(packed))
    if backend == "flex":  # forward only on CPU (eager flex, fp32): the GPU path's mask_mod and layout
        q, k, v = q.float(), k.float(), v.float()
    out = packed_attention(packed, backend)(0, q, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
