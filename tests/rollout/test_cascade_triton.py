"""The Triton cascade decode's partials launch (cascade_attention.py): prefix and suffix programs
share one grid, so no program may rely on another's write. The interpreter runs a launch's
programs one after another in grid order; running every launch both forward and reversed puts
each pair of programs that write the same slot in both orders, so a race shows as a wrong value
in one of the two. torch.empty is NaN-poisoned: a slot nobody writes shows too."""
import pytest
import torch

from rlpt_fast.launch_count import count_launches
from rlpt_fast.rollout.cascade_attention import (
    PrefixGroups,
    build_cascade,
    cascade_decode_attention_triton,
    prefix_groups,
)
from rlpt_fast.rollout.decode_attention import decode_attention, decode_attention_reference

BS, D = 4, 16
# grouped and ungrouped rows interleaved: rows 1 and 4 share nothing (start 0); rows 0, 3, 5
# share 3 blocks, rows 2 and 6 one (a padded member slot, since the widest group has 3)
TABLES = [[0, 1, 2, 10], [20, 21], [5, 14], [0, 1, 2, 11, 12], [22, 23, 24, 25], [0, 1, 2, 13], [5, 15, 16]]
LENS = [14, 7, 6, 20, 15, 13, 9]


@pytest.fixture(params=["forward", "reversed"])
def program_order(request, monkeypatch):
    """Every interpreted launch runs its programs in this grid order."""
    if request.param == "reversed":
        if torch.cuda.is_available():
            pytest.skip("reversed order runs on the CPU (CI, Triton's interpreter runs programs in grid order); "
                        "a GPU runs them concurrently: there the forward case and "
                        "test_prefix_programs_alone_write_exactly_the_grouped_rows_prefix_slots check the rule")
        try:  # the interpreter's internals (Triton 3.6-3.8): skip, not fail, where they moved
            from triton.runtime.interpreter import interpreter_builder as builder
            set_idx, _ = builder.set_grid_idx, builder.grid_dim
        except (ImportError, AttributeError):
            pytest.skip("this Triton's interpreter has no set_grid_idx / grid_dim to reorder programs (CI's "
                        "Triton 3.6-3.8 has them); test_prefix_programs_alone_write_exactly_the_grouped_rows_"
                        "prefix_slots checks the one-writer rule on any Triton, CPU or GPU")

        def reversed_idx(x, y, z):
            nx, ny, nz = builder.grid_dim
            set_idx(nx - 1 - x, ny - 1 - y, nz - 1 - z)

        monkeypatch.setattr(builder, "set_grid_idx", reversed_idx)
    return request.param


def cascade_case(hq: int, hkv: int, splits: int, prefix_splits: int, device, padding_rows: int = 0):
    """Arguments of cascade_decode_attention_triton for TABLES/LENS, and the reference output.
    padding_rows: rows appended after the grouping was built, as a CUDA-graph bucket pads the
    batch (one context token, start 0); the groups' member padding (= 7) then names the first."""
    gen = torch.Generator().manual_seed(hq + splits)
    k_cache = torch.randn(40, BS, hkv, D, generator=gen)
    v_cache = torch.randn(40, BS, hkv, D, generator=gen)
    k_cache[30:] = float("nan")  # blocks no row reads
    v_cache[30:] = float("nan")
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    groups = prefix_groups(build_cascade(TABLES, LENS, BS, device), hq // hkv, hkv, 1)
    # two padding items pointing at the trailing group of prefix length 0 (as the CUDA graphs' static buffers do)
    pad = torch.tensor([[groups.lens.shape[0] - 1, 0]] * 2, dtype=torch.int32, device=device)
    starts = torch.cat([groups.starts, groups.starts.new_zeros(padding_rows)])
    groups = PrefixGroups(starts, groups.tables, groups.lens, groups.members, torch.cat([groups.items, pad]),
                          prefix_splits, groups.max_prefix)
    tables, lens = TABLES + [[29]] * padding_rows, LENS + [1] * padding_rows
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, D, generator=gen).to(device)
    want = decode_attention_reference(q, k_cache, v_cache, bt, ctx, D ** -0.5)
    return (q, k_cache, v_cache, bt, ctx, groups, D ** -0.5, splits, width * BS), want


# (64, 2): 32 query heads per KV head, 2 members per prefix program: a group spans two items
@pytest.mark.parametrize("hq,hkv,splits,prefix_splits", [(4, 2, 1, 1), (6, 2, 2, 3), (8, 1, 3, 2), (64, 2, 2, 2)])
def test_cascade_partials_match_reference_in_either_program_order(hq, hkv, splits, prefix_splits, device,
                                                                  program_order, poisoned_empty):
    """Every prefix slot has one writer: the prefix programs for a grouped row (start > 0), the
    row's first split program (lse -inf) for an ungrouped one."""
    args, want = cascade_case(hq, hkv, splits, prefix_splits, device)
    assert args[5].starts.tolist() == [12, 0, 4, 12, 0, 12, 4]
    torch.testing.assert_close(cascade_decode_attention_triton(*args), want, atol=2e-5, rtol=1e-5)


def test_member_padding_naming_a_row_without_group_leaves_it_alone(device, program_order, poisoned_empty):
    """In a CUDA-graph bucket the groups' member padding (= B) names the bucket's first padding
    row: its start is 0, so its prefix slots stay its split programs' (empty), in either order."""
    args, want = cascade_case(6, 2, 2, 2, device, padding_rows=2)
    assert (args[5].members == len(LENS)).any()
    torch.testing.assert_close(cascade_decode_attention_triton(*args), want, atol=2e-5, rtol=1e-5)


def test_cascade_decode_is_two_launches_and_plain_decode_two(device):
    """Per decoder layer of a decode step: the partials launch (prefix and suffix) and the combine."""
    args, want = cascade_case(6, 2, 2, 2, device)
    out = {}
    assert count_launches(lambda: out.setdefault("cascade", cascade_decode_attention_triton(*args))) == 2
    torch.testing.assert_close(out["cascade"], want, atol=2e-5, rtol=1e-5)
    q, k_cache, v_cache, bt, ctx, _, scale, splits, max_context = args
    assert count_launches(lambda: out.setdefault("plain", decode_attention(q, k_cache, v_cache, bt, ctx, scale, splits,
                                                                           max_context))) == 2
    torch.testing.assert_close(out["plain"], want, atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the combine then reads the NaN slots left unwritten
def test_prefix_programs_alone_write_exactly_the_grouped_rows_prefix_slots(device, monkeypatch):
    """The one-writer rule checked without relying on program order: the partials launch run with
    its prefix programs only (the first prefix_programs of its grid) writes every prefix slot of
    every grouped row and none of a row without a group (a padding row the member padding names)."""
    from rlpt_fast.rollout import cascade_attention

    args, _ = cascade_case(6, 2, 2, 2, device, padding_rows=2)
    kernel, seen = cascade_attention._cascade_partials_kernel, {}

    class PrefixOnly:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                lse, num_splits, prefix_programs = a[11], a[15], a[18]
                lse.fill_(float("nan"))
                kernel[(prefix_programs,)](*a, **kw)
                seen["prefix_slots"] = lse[:, :, num_splits:].clone()
            return launch

    monkeypatch.setattr(cascade_attention, "_cascade_partials_kernel", PrefixOnly())
    cascade_decode_attention_triton(*args)
    slots, starts = seen["prefix_slots"].cpu(), args[5].starts.cpu()
    grouped = starts > 0
    assert not slots[grouped].isnan().any()   # every head and prefix split of a grouped row
    assert slots[~grouped].isnan().all()      # untouched: the row's own split programs fill them
