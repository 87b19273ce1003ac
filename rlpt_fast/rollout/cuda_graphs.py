"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (GPU only).

A decode step of a small model is a few hundred tiny kernels; launching them from Python costs
more than running them. Each bucket's graph is captured once over static input buffers; a step
copies its inputs into the first B rows (padding rows write to slot -1, i.e. nowhere, and attend
to one token) and replays the graph of the smallest bucket >= B.

With the Triton backend the graphs run the cascade decode (cascade_attention.py) over static
group buffers sized for the worst case: at most max_bs // 2 groups (a group has >= 2 members),
work items padded with an empty group. A batch with nothing shared simply has no items.

The graphs hold pointers to the parameters, not copies: in-place optimizer steps are seen by the
next replay. Replacing a parameter tensor (not in place), or toggling a Python-level switch such as
disabling a LoRA adapter, is NOT seen: build a new Engine (or call engine.recapture()) after that.
The split counts of decode attention are fixed per bucket from max_model_len.
"""
from __future__ import annotations

import torch

from rlpt_fast.rollout.attention import DecodeMeta
from rlpt_fast.rollout.cascade_attention import BLOCK_M, PrefixGroups
from rlpt_fast.rollout.decode_attention import choose_num_splits


class DecodeGraphs:
    def __init__(self, runner) -> None:
        self.runner = runner
        cfg = runner.config
        dev = runner.device
        self.max_bs = cfg.max_num_seqs
        self.buckets = sorted({b for b in [1, 2, 4, 8, *range(16, self.max_bs + 1, 16)] if b <= self.max_bs} | {self.max_bs})
        width = cfg.max_blocks_per_seq
        self.ids = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, self.max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((self.max_bs,), -1, dtype=torch.long, device=dev)
        self.lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(self.max_bs, width, dtype=torch.int32, device=dev)
        self.cascade = runner.backend.name == "triton" and cfg.cascade_decode
        group = runner.model.config.num_attention_heads // runner.num_kv_heads
        self.pad_group = self.max_bs // 2
        items = -(-self.max_bs // max(1, BLOCK_M // group)) + self.pad_group
        self.starts = torch.zeros(self.max_bs, dtype=torch.int32, device=dev)
        self.group_tables = torch.zeros(self.pad_group + 1, width, dtype=torch.long, device=dev)
        self.group_lens = torch.zeros(self.pad_group + 1, dtype=torch.long, device=dev)
        self.members = torch.full((self.pad_group + 1, self.max_bs), self.max_bs, dtype=torch.long, device=dev)
        self.items = torch.tensor([[self.pad_group, 0]] * items, dtype=torch.int32, device=dev)
        self.loaded_groups: PrefixGroups | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture()

    def _meta(self, b: int) -> DecodeMeta:
        r, cfg = self.runner, self.runner.config
        max_context = self.tables.shape[1] * cfg.block_size
        meta = DecodeMeta(self.slots[:b], self.tables[:b], self.lens[:b],
                          choose_num_splits(b, r.num_kv_heads, cfg.max_model_len, r.num_sms), max_context)
        if self.cascade:
            splits = choose_num_splits(max(1, b // 8), r.num_kv_heads, cfg.max_model_len, r.num_sms)
            meta.groups = PrefixGroups(self.starts[:b], self.group_tables, self.group_lens, self.members,
                                       self.items, splits, max_context)
        return meta

    def _forward(self, b: int) -> torch.Tensor:
        return self.runner.decode_logits(self.ids[:b], self.positions[:, :b], self._meta(b))

    @torch.no_grad()
    def capture(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
        pool = None
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._forward(b)  # warm-up: compiles kernels, settles allocator state
            torch.cuda.synchronize(self.runner.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)

    def fits(self, b: int) -> bool:
        return b <= self.max_bs

    def run(self, inputs: torch.Tensor, tables: torch.Tensor, cascade) -> torch.Tensor:
        """inputs (4, B) int64 on the device: token ids, positions, slots, context lengths;
        tables (B, W) int32 on the device; cascade: the step's CascadeMeta or None. Returns the
        logits (B, V), valid until the next replay."""
        b = inputs.shape[1]
        bucket = next(x for x in self.buckets if x >= b)
        self.ids[:b].copy_(inputs[0])
        self.positions[:, :b].copy_(inputs[1].expand(3, -1))
        self.slots[b:bucket].fill_(-1)  # padding rows store nothing and attend to one token
        self.slots[:b].copy_(inputs[2])
        self.lens[b:bucket].fill_(1)
        self.lens[:b].copy_(inputs[3])
        self.tables[:b, :tables.shape[1]].copy_(tables)
        if self.cascade:
            self._load_groups(b, bucket, self.runner._groups if cascade is not None else None)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]

    def _load_groups(self, b: int, bucket: int, groups: PrefixGroups | None) -> None:
        """Copies the step's grouping into the static buffers (only when it changed)."""
        if groups is self.loaded_groups:
            return
        self.starts[:bucket].zero_()
        self.items[:, 0].fill_(self.pad_group)
        self.items[:, 1].zero_()
        if groups is not None:
            # groups' own trailing pad group (prefix length 0) lands at a real index: harmless,
            # no item points at it. Member padding (= b) may name a padding row of the bucket,
            # whose output is discarded.
            ng, wp = groups.tables.shape
            self.starts[:b].copy_(groups.starts)
            self.group_tables[:ng, :wp].copy_(groups.tables)
            self.group_lens[:ng].copy_(groups.lens)
            self.members[:ng].fill_(self.max_bs)
            self.members[:ng, :groups.members.shape[1]].copy_(groups.members)
            self.items[:groups.items.shape[0]].copy_(groups.items)
        self.loaded_groups = groups
