"""Paged KV-cache bookkeeping: which cache blocks each sequence owns. Pure Python (no torch).

A block holds the K/V of `block_size` consecutive tokens of one sequence. Blocks are reference
counted so that the n samples of one prompt share the prompt's blocks: `fork` gives every child
the parent's block table; the first child to write into a shared, partly filled last block gets
a private copy (copy-on-write: `append_slot` returns the (src, dst) block copies the model
runner must do before the step writes K/V).

Prefix caching (optional) names each full block by a chained hash of every token up to its end
plus the pixel digests of the images those tokens show, so two requests with the same prompt
prefix (same text AND same images) share those blocks. A block is hashed only after its K/V
are computed (`commit`), so nobody reads a block another sequence has not written yet. Freed
blocks keep their hash until reused (least recently freed first), so a later request can still
hit them.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from rlpt_fast.rollout.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def block_hash(prev: bytes | None, tokens: list[int], digests: list[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"")
    h.update(array("q", tokens).tobytes())
    for d in digests:
        h.update(d)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockManager needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order = LRU
        self.hash_to_block: dict[bytes, int] = {}
        self.num_hit_tokens = 0  # running total of tokens served from the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    # -- allocation -------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return seq.num_blocks_needed(self.block_size) - len(hits) + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Gives seq blocks for all its tokens; leading prefix-cache hits count as computed."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}")
        hits = self._prefix_hits(seq)
        for b in hits:
            self._ref(b)
        seq.block_table = hits + [self._take_free() for _ in range(seq.num_blocks_needed(self.block_size) - len(hits))]
        seq.num_cached_tokens = len(hits) * self.block_size
        self.num_hit_tokens += seq.num_cached_tokens
        seq.num_hashed_blocks = len(hits)

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):  # tail first, so the prefix survives eviction longest
            block = self.blocks[b]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {b} by sequence {seq.seq_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[b] = None
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Children share every block of the parent (the parent keeps its own references)."""
        for child in children:
            child.block_table = list(parent.block_table)
            for b in parent.block_table:
                self.blocks[b].ref_count += 1

    # -- decode -----------------------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        return self._append_needs_block(seq) <= self.num_free_blocks

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Makes the slot of the last token (position num_tokens - 1) writable by seq alone.

        Returns the block copies [(src, dst)] to do before writing (copy-on-write of a shared block).
        """
        i = (seq.num_tokens - 1) // self.block_size
        if i > len(seq.block_table):
            raise RuntimeError(f"sequence {seq.seq_id}: token {seq.num_tokens - 1} is past block table {seq.block_table}")
        if i == len(seq.block_table):
            seq.block_table.append(self._take_free())
            return []
        old = seq.block_table[i]
        if self.blocks[old].ref_count == 1:
            return []
        new = self._take_free()
        self.blocks[old].ref_count -= 1
        seq.block_table[i] = new
        return [(old, new)]

    def commit(self, seq: Sequence) -> None:
        """Registers the hashes of seq's full blocks whose K/V are now computed."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_cached_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, full):
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            h = block_hash(prev, seq.block_tokens(i, self.block_size), self._digests(seq, i))
            block = self.blocks[seq.block_table[i]]
            block.hash = h
            self.hash_to_block.setdefault(h, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block: their K/V were made by weights that have changed since.
        Only while no sequence holds a block (a live sequence's next hashes chain on its last)."""
        if self.num_free_blocks != len(self.blocks):
            held = len(self.blocks) - self.num_free_blocks
            raise RuntimeError(f"reset_prefix_cache while sequences hold {held} blocks")
        for b in self.hash_to_block.values():  # (a hash outside the map is never read: _take_free drops it)
            self.blocks[b].hash = None
        self.hash_to_block.clear()

    # -- internals --------------------------------------------------------------------------
    def _append_needs_block(self, seq: Sequence) -> int:
        i = (seq.num_tokens - 1) // self.block_size
        if i >= len(seq.block_table):
            return 1
        return int(self.blocks[seq.block_table[i]].ref_count > 1)

    def _take_free(self) -> int:
        if not self.free_ids:
            raise RuntimeError("no free KV-cache block (the scheduler should have checked)")
        b = next(iter(self.free_ids))
        del self.free_ids[b]
        block = self.blocks[b]
        if block.hash is not None and self.hash_to_block.get(block.hash) == b:
            del self.hash_to_block[block.hash]
        block.hash = None
        block.ref_count = 1
        return b

    def _ref(self, b: int) -> None:
        if self.blocks[b].ref_count == 0:
            del self.free_ids[b]
        self.blocks[b].ref_count += 1

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Leading cached blocks; at least one token is always left to compute (for its logits)."""
        if not self.enable_prefix_caching:
            return []
        hits, prev = [], None
        for i in range((seq.num_tokens - 1) // self.block_size):
            prev = block_hash(prev, seq.block_tokens(i, self.block_size), self._digests(seq, i))
            b = self.hash_to_block.get(prev)
            if b is None:
                break
            hits.append(b)
        return hits

    def _digests(self, seq: Sequence, i: int) -> list[bytes]:
        lo, hi = i * self.block_size, (i + 1) * self.block_size
        return [s.digest for s in seq.image_spans if s.start < hi and s.end > lo]
