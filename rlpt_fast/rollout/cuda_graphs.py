"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (GPU only).

A decode step of a small model is a few hundred tiny kernels; launching them from Python costs
more than running them. Each bucket's graph is captured once over static input buffers; a step
copies its inputs into the first B rows (padding rows write to slot -1, i.e. nowhere, and attend
to one token) and replays the graph of the smallest bucket >= B.

The graphs hold pointers to the parameters, not copies: in-place optimizer steps are seen by the
next replay. Replacing a parameter tensor (not in place), or toggling a Python-level switch such as
disabling a LoRA adapter, is NOT seen: build a new Engine (or call engine.recapture()) after that.
The split count of decode attention is fixed per bucket from max_model_len.
"""
from __future__ import annotations

import torch

from rlpt_fast.rollout.attention import DecodeMeta
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
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture()

    def _meta(self, b: int) -> DecodeMeta:
        cfg = self.runner.config
        splits = choose_num_splits(b, self.runner.num_kv_heads, cfg.max_model_len, self.runner.num_sms)
        return DecodeMeta(self.slots[:b], self.tables[:b], self.lens[:b], splits, self.tables.shape[1] * cfg.block_size)

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

    def run(self, inputs: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """inputs (4, B) int64 on the device: token ids, positions, slots, context lengths;
        tables (B, W) int32 on the device. Returns the logits (B, V), valid until the next replay."""
        b = inputs.shape[1]
        bucket = next(x for x in self.buckets if x >= b)
        self.ids[:b].copy_(inputs[0])
        self.positions[:, :b].copy_(inputs[1].expand(3, -1))
        self.slots[b:bucket].fill_(-1)  # padding rows store nothing and attend to one token
        self.slots[:b].copy_(inputs[2])
        self.lens[b:bucket].fill_(1)
        self.lens[:b].copy_(inputs[3])
        self.tables[:b, :tables.shape[1]].copy_(tables)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]
