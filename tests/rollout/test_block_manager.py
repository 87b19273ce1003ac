"""Block manager: reference counts stay exact and no block leaks or is freed twice, under random
sequences of allocate / fork / append / free / preempt (hypothesis), plus the copy-on-write and
prefix-cache behaviour spelled out case by case."""
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpt_fast.rollout.block_manager import BlockManager
from rlpt_fast.rollout.sequence import ImageSpan, Sequence, StopRule

STOP = StopRule(max_tokens=1000)


def seq_of(tokens, spans=()):
    return Sequence(list(tokens), len(tokens), STOP, image_spans=tuple(spans))


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = Counter(b for s in live for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block
        assert (block.ref_count == 0) == (block.block_id in bm.free_ids), block
    for s in live:
        assert len(s.block_table) >= s.num_blocks_needed(bm.block_size) - 1
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].hash == h


ops = st.lists(st.tuples(st.sampled_from(["alloc", "fork", "append", "free", "preempt"]),
                         st.integers(0, 1000), st.integers(1, 40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4, 16]), num_blocks=st.integers(4, 40),
       prefix=st.booleans())
def test_random_operations_keep_ref_counts_exact(ops, block_size, num_blocks, prefix):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    live: list[Sequence] = []
    for op, pick, size in ops:
        if op == "alloc":
            s = seq_of([pick % 7] * size)  # repeated content exercises prefix hits
            if bm.can_allocate(s):
                bm.allocate(s)
                s.num_cached_tokens = s.num_tokens
                bm.commit(s)
                live.append(s)
        elif live:
            s = live[pick % len(live)]
            if op == "fork":
                children = [s.fork(i) for i in range(1 + size % 4)]
                bm.fork(s, children)
                bm.free(s)
                live.remove(s)
                live += children
            elif op == "append":
                s.append(pick % 5, 0.0)
                if bm.can_append(s):
                    free_before = bm.num_free_blocks
                    copies = bm.append_slot(s)
                    assert free_before - bm.num_free_blocks <= 1 and len(copies) <= 1
                    s.num_cached_tokens = s.num_tokens
                    bm.commit(s)
                else:
                    s.token_ids.pop()
                    s.logprobs.pop()
            else:  # free and preempt both give every block back
                bm.free(s)
                live.remove(s)
                assert s.block_table == [] and s.num_cached_tokens == 0
        check_invariants(bm, live)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_fork_shares_full_blocks_and_copies_partial_last_block_on_write():
    bm = BlockManager(16, 4)
    parent = seq_of(range(10))  # blocks: [0..3] [4..7] [8, 9]
    bm.allocate(parent)
    parent.num_cached_tokens = 10
    children = [parent.fork(i) for i in range(3)]
    bm.fork(parent, children)
    bm.free(parent)
    table = list(children[0].block_table)
    assert all(c.block_table == table for c in children)
    assert [bm.blocks[b].ref_count for b in table] == [3, 3, 3]
    copies = []
    for i, c in enumerate(children):
        c.append(100 + i, 0.0)
        copies.append(bm.append_slot(c))
    # the first two writers copy the shared partial block; the last one owns it and writes in place
    assert copies[0] == [(table[2], children[0].block_table[2])]
    assert copies[1] == [(table[2], children[1].block_table[2])]
    assert copies[2] == [] and children[2].block_table == table
    assert [bm.blocks[b].ref_count for b in table] == [3, 3, 1]
    assert len({c.block_table[2] for c in children}) == 3


def test_fork_at_block_boundary_copies_nothing():
    bm = BlockManager(16, 4)
    parent = seq_of(range(8))
    bm.allocate(parent)
    children = [parent.fork(i) for i in range(2)]
    bm.fork(parent, children)
    bm.free(parent)
    for c in children:
        c.append(1, 0.0)
        assert bm.append_slot(c) == []
    assert children[0].block_table[:2] == children[1].block_table[:2]
    assert children[0].block_table[2] != children[1].block_table[2]


def test_double_free_is_refused():
    bm = BlockManager(4, 4)
    s = seq_of(range(5))
    bm.allocate(s)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(s)


def test_prefix_cache_hits_after_commit_and_respects_images():
    bm = BlockManager(32, 4, enable_prefix_caching=True)
    a = seq_of(range(11), [ImageSpan(5, 9, b"img-A")])
    bm.allocate(a)
    assert a.num_cached_tokens == 0
    b = seq_of(range(11), [ImageSpan(5, 9, b"img-A")])
    bm.allocate(b)  # a is not computed yet: nothing may be shared
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    a.num_cached_tokens = 11
    bm.commit(a)
    same = seq_of(list(range(11)) + [42], [ImageSpan(5, 9, b"img-A")])
    bm.allocate(same)
    assert same.num_cached_tokens == 8 and same.block_table[:2] == a.block_table[:2]
    other_image = seq_of(range(11), [ImageSpan(5, 9, b"img-B")])
    bm.allocate(other_image)
    # block 0 (tokens 0..3) shows no image and is shared; block 1 shows image B, not A
    assert other_image.num_cached_tokens == 4 and other_image.block_table[0] == a.block_table[0]
    # a freed sequence's blocks stay hittable until reused
    bm.free(a)
    again = seq_of(range(11), [ImageSpan(5, 9, b"img-A")])
    bm.allocate(again)
    assert again.num_cached_tokens == 8


def test_prefix_cache_always_leaves_a_token_to_compute():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq_of(range(8))
    bm.allocate(a)
    a.num_cached_tokens = 8
    bm.commit(a)
    b = seq_of(range(8))
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the last block is recomputed so its logits exist


def test_reset_prefix_cache_forgets_every_block_and_only_when_none_is_held():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq_of(range(9))
    bm.allocate(a)
    a.num_cached_tokens = 9
    bm.commit(a)
    with pytest.raises(RuntimeError, match="while sequences hold 3 blocks"):
        bm.reset_prefix_cache()
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.hash_to_block == {} and all(b.hash is None for b in bm.blocks)
    b = seq_of(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0
