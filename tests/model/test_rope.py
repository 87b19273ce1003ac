"""rope_positions equals transformers' get_rope_index (positions and delta) for any layout."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlpt_fast.model.rope import mrope_cos_sin, rope_positions

IMG = 99
MERGE = 2


def _sequence(layout: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """layout items: int n = n text tokens, (h, w) = an image of h x w patches (t = 1), wrapped
    in vision start/end tokens as the chat template does (transformers' get_rope_index cannot
    split two image-token runs that touch)."""
    ids, grids, tok = [], [], 5
    for item in layout:
        if isinstance(item, int):
            ids += [tok + i % 50 for i in range(item)]
        else:
            h, w = item
            ids += [3] + [IMG] * (h * w // MERGE**2) + [4]
            grids.append([1, h, w])
    return torch.tensor(ids), (torch.tensor(grids) if grids else None)


def _ours(ids, grids):
    return rope_positions(ids, grids, image_token_id=IMG, spatial_merge_size=MERGE)


def _check(pair, layout):
    ids, grids = _sequence(layout)
    ids_hf = ids.clone()
    ids_hf[ids == IMG] = pair.ours.config.image_token_id
    pos, delta = pair.ours.rope_positions(ids_hf, grids)
    if grids is None:  # transformers' text-only path: arange, delta 0
        assert torch.equal(pos, torch.arange(len(ids)).expand(3, -1)) and delta == 0
        return
    ref_pos, ref_delta = pair.ref_rope_index(ids_hf[None], grids)
    assert torch.equal(pos, ref_pos[:, 0]) and delta == int(ref_delta)


@pytest.mark.parametrize("layout", [
    [7],
    [3, (4, 6), 5],
    [(8, 4)],  # image alone: delta from the image's extent
    [2, (4, 4), (6, 10), 1, (12, 2), 9],  # adjacent images, tall and wide grids
])
def test_matches_transformers(pair, layout):
    _check(pair, layout)


grid = st.tuples(st.integers(1, 6), st.integers(1, 6)).map(lambda hw: (2 * hw[0], 2 * hw[1]))
layouts = st.lists(st.one_of(st.integers(1, 6), grid), min_size=1, max_size=7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts)
def test_matches_transformers_random_layouts(pair, layout):
    _check(pair, layout)


def test_appended_tokens_continue_at_t_plus_delta():
    ids, grids = _sequence([3, (4, 6), 2, (6, 2), 4])
    pos, delta = _ours(ids, grids)
    longer = torch.cat([ids, torch.tensor([7, 8, 9])])
    pos2, delta2 = _ours(longer, grids)
    t = torch.arange(len(ids), len(longer))
    assert torch.equal(pos2[:, : len(ids)], pos) and delta2 == delta < 0
    assert torch.equal(pos2[:, len(ids):], (t + delta).expand(3, -1))


def test_image_token_count_mismatch_is_an_error():
    ids, grids = _sequence([3, (4, 4), 2])
    with pytest.raises(ValueError, match="image tokens"):
        _ours(torch.cat([ids, torch.tensor([IMG])]), grids)
    with pytest.raises(ValueError, match="consecutive image tokens"):
        _ours(ids, torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="image tokens"):
        _ours(ids, None)


def test_mrope_sections_pick_axes():
    """Frequencies of section i rotate by the position on axis i (t, h, w)."""
    pos = torch.tensor([[1], [2], [3]])
    cos, _ = mrope_cos_sin(pos, head_dim=16, theta=10000.0, mrope_section=[2, 3, 3], dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    axis = torch.tensor([1, 1, 2, 2, 2, 3, 3, 3])
    expected = torch.cos(axis * inv).double()
    torch.testing.assert_close(cos[0], torch.cat([expected, expected]))


@pytest.mark.parametrize("grid", [[1, 4, 5], [1, 3, 4], [0, 4, 4], [1, 0, 4]])
def test_image_grid_that_does_not_tile_merge_blocks_is_an_error(grid):
    """h and w count patches, merged merge x merge: a grid that does not tile would floor its token
    count here and fail later in the vision tower's reshape."""
    ids = torch.tensor([5, 3] + [IMG] * 4 + [4])
    with pytest.raises(ValueError, match=rf"image 0 .*grid {grid[0]}x{grid[1]}x{grid[2]}.*{MERGE}"):
        _ours(ids, torch.tensor([grid]))
