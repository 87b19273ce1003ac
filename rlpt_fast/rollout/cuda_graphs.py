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
LoRA adapters are read through their inference caches (model/lora_inference.py: A and scaling * B
in the activations' dtype), not the fp32 parameters: a replay runs no Python, so an optimizer step
on the adapters is seen only because Engine.generate (and capture) first refreshes those caches in
place (lora.pinned_lora_caches). engine.step() called alone after an adapter update needs
lora.refresh_lora_caches(model) first.

Sampling runs in graphs too: a step replays the bucket's forward graph, then a sampler graph that
reads the forward's static logits and writes each row's token and log-prob into a static (B, 2)
float64 buffer (pack_samples: the host reads it in one copy, with no kernel of its own).
  - Variants. The sampler's host flags (SamplingTensors: greedy, sampled, scaled, filtered) choose
    its code path, so a sampler graph is captured per (bucket, flags): with the forward graphs for
    the two flag sets runs use most (PRECAPTURED), any other at its first use (a few dozen
    kernels, but torch.cuda.graph also runs gc.collect and empties the allocator's cache: a pause,
    once per bucket and flags). Each is the eager code path itself: the eager sampler's bits for the same
    logits and uniforms. Why not one general path: counted on the CPU (kernels per step / passes
    over the (B, V) float32 logits, 78 MB each at B = 128, V = 151936; a bf16 model adds a cast):
    all greedy 4 / 2; temperature 1, no greedy row, no filter (the recipe's rollouts) 10 / 4; the
    general unfiltered path 16 / 6; with top-k / top-p 39 / 16 (a sort among them); each graph
    adds 4 tiny kernels (the uniform's gather, two output copies, the counter). The general path
    would cost the recipe 2 more passes and everyone the filter's 10.
  - Why a second graph instead of forward + sampling in one: variants do not repeat the forward's
    capture (hundreds of kernels, its memory); the price is one more graph launch per step
    (microseconds of host time). All graphs share one memory pool and run back to back on one
    stream, so the sampler's (B, V) intermediates reuse the pool's free blocks; the pool keeps
    those of the largest bucket (the eager sampler allocated the same every step): at temperature
    1, 4 float32 (B, V), 0.6 GB at B = 256, V = 151936. Like the forward graphs' logits, they come
    out of the 1 - gpu_memory_utilization headroom (kv_cache.py measures activations, not graphs).
  - Per-row inputs live in static buffers: temperature, top_k, top_p, and the (max_bs, AHEAD)
    table of uniforms that RowParams made for the rows (copied device to device when the rows
    change or the table is remade). The sampler graph reads the column named by a device counter
    and advances the counter by one, so a steady decode step (same rows, one position further)
    writes nothing into these buffers: the host only checks that the step's column is the one the
    device holds.
  - Padding rows (b..bucket) sample with temperature 1, no filter, u = 0.5: finite, never read.
  - The sampler graph also advances the static inputs to the next step of the same rows (ids =
    the sampled tokens, positions / slots / lengths + 1 on live rows; padding rows keep slot -1 and
    length 1). While the same rows decode and no block table changes (the runner's "steady" step,
    a row's next slot then lies in its current block) the runner passes no inputs: the step copies
    nothing before its two replays.
"""
from __future__ import annotations

import weakref

import torch

from rlpt_fast.rollout.attention import DecodeMeta
from rlpt_fast.rollout.cascade_attention import BLOCK_M, PrefixGroups
from rlpt_fast.rollout.decode_attention import choose_num_splits
from rlpt_fast.rollout.sampler import AHEAD, RowParams, SamplingTensors

# sampler code paths (greedy, sampled, scaled, filtered) captured with the forward graphs: plain
# sampling at temperature 1 (the recipe's rollouts) and all greedy (evaluation)
PRECAPTURED = ((False, True, False, False), (True, False, False, False))


class DecodeGraphs:
    def __init__(self, runner) -> None:
        # A weak reference: the runner owns these graphs, and a strong one back would make every
        # engine cyclic garbage, its KV cache (most of the card) alive until a full collection; the
        # next engine in the process then measured a full card (H100, 2026-11-27).
        self.runner = weakref.proxy(runner)
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
        self.live = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)  # 1: a row of the batch
        self.advanced_rows: int | None = None  # B when the static inputs hold the next step of B rows
        # sampling: per-row parameters, RowParams' uniform table, the column the next step reads
        self.temperature = torch.ones(self.max_bs, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.top_p = torch.ones(self.max_bs, dtype=torch.float32, device=dev)
        self.uniforms = torch.full((self.max_bs, AHEAD), 0.5, dtype=torch.float32, device=dev)
        self.column = torch.zeros(1, dtype=torch.int64, device=dev)
        self.sampled = torch.zeros(self.max_bs, 2, dtype=torch.float64, device=dev)  # token id, log-prob
        self.loaded_rows: RowParams | None = None
        self.loaded_table: torch.Tensor | None = None
        self.next_column: int | None = None  # the column the device counter holds (None: unknown)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.samplers: dict[tuple[int, tuple[bool, ...]], torch.cuda.CUDAGraph] = {}
        self.pool = None
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

    def _sample(self, b: int, flags: tuple[bool, bool, bool, bool]) -> None:
        """Samples the bucket's static logits into the static (b, 2) samples on the code path of
        flags (greedy, sampled, scaled, filtered); advances the column counter and the inputs."""
        u = self.uniforms[:b].gather(1, self.column.expand(b, 1)).squeeze(1)                   # (b,)
        greedy, sampled, scaled, filtered = flags
        st = SamplingTensors(self.temperature[:b], self.top_k[:b], self.top_p[:b], u, filtered, greedy, sampled, scaled)
        tokens, logprobs = self.runner.backend.sample(self.outputs[b], st)
        self.sampled[:b, 0].copy_(tokens)
        self.sampled[:b, 1].copy_(logprobs)
        self.column.add_(1)
        live = self.live[:b]  # the next step's inputs, should the same rows go on
        self.ids[:b].copy_(tokens)
        self.positions[:, :b].add_(live)
        self.slots[:b].add_(live)
        self.lens[:b].add_(live)

    def _record(self, fn):
        """Warm-up call of fn (compiles kernels, settles the allocator), then fn captured into a
        CUDA graph in the shared pool. Returns (graph, fn's output in the pool)."""
        if self.runner.device.type != "cuda":  # (tests replace this method to replay on the CPU)
            raise ValueError(f"EngineConfig.cuda_graphs=True needs the model on a CUDA device; it is on "
                             f"{self.runner.device} (None captures on CUDA only)")
        fn()
        torch.cuda.synchronize(self.runner.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, self.pool):
            out = fn()
        self.pool = graph.pool()
        torch.cuda.synchronize(self.runner.device)
        return graph, out

    @torch.no_grad()
    def capture(self) -> None:
        """(Re)captures the forward graphs, largest bucket first (smaller ones reuse its memory),
        then the PRECAPTURED sampler graphs; other sampler graphs again at their first use."""
        self.graphs.clear()
        self.outputs.clear()
        self.samplers.clear()
        self.pool, self.next_column, self.advanced_rows = None, None, None
        self.slots.fill_(-1)  # the warm-up forwards store nothing
        self.lens.fill_(1)
        self.live.zero_()
        for b in reversed(self.buckets):
            self.graphs[b], self.outputs[b] = self._record(lambda b=b: self._forward(b))
        for b in reversed(self.buckets):
            for flags in PRECAPTURED:
                self._sampler(b, flags)

    def _sampler(self, bucket: int, flags: tuple[bool, bool, bool, bool]):
        """The sampler graph of the bucket for the code path of flags (greedy, sampled, scaled,
        filtered), captured at first use."""
        graph = self.samplers.get((bucket, flags))
        if graph is None:
            moved = (self.ids, self.positions, self.slots, self.lens, self.column)  # by the warm-up call
            kept = [t.clone() for t in moved]
            with torch.no_grad():
                graph, _ = self._record(lambda: self._sample(bucket, flags))
            for t, k in zip(moved, kept):
                t.copy_(k)
            self.samplers[bucket, flags] = graph
        return graph

    def fits(self, b: int) -> bool:
        return b <= self.max_bs

    def run(self, inputs: torch.Tensor | None, tables: torch.Tensor, cascade, rows: RowParams,
            positions: list[int]) -> torch.Tensor:
        """One decode step, forward and sampling. inputs (4, B) int64 on the device: token ids,
        positions, slots, context lengths; or None when the static inputs hold this step already
        (advanced_rows == B: the previous step's rows one token further, same block tables);
        tables (B, W) int32 on the device; cascade: the step's CascadeMeta or None; rows: the B
        rows' sampling parameters; positions: each row's token count (its uniform's key). Returns
        (B, 2) float64: each row's token id and log-prob (pack_samples), a static buffer valid
        until the next replay."""
        b = len(positions)
        bucket = next(x for x in self.buckets if x >= b)
        sampler = self._sampler(bucket, (rows.greedy, rows.sampled, rows.scaled, rows.filtered))
        if inputs is not None:
            self._load_inputs(b, bucket, inputs, tables)
        elif self.advanced_rows != b:
            raise RuntimeError(f"DecodeGraphs.run: no inputs for {b} rows, but the static buffers hold the next "
                               f"step of {self.advanced_rows} rows")
        if self.cascade:
            self._load_groups(b, bucket, self.runner._groups if cascade is not None else None)
        self._load_sampling(b, rows, rows.column(positions))
        self.graphs[bucket].replay()
        sampler.replay()
        self.advanced_rows = b
        return self.sampled[:b]

    def _load_inputs(self, b: int, bucket: int, inputs: torch.Tensor, tables: torch.Tensor) -> None:
        self.ids[:b].copy_(inputs[0])
        self.positions[:, :b].copy_(inputs[1].expand(3, -1))
        self.slots[:b].copy_(inputs[2])
        self.lens[:b].copy_(inputs[3])
        self.tables[:b, :tables.shape[1]].copy_(tables)
        self.slots[b:bucket].fill_(-1)  # padding rows store nothing, attend to one token, stay put
        self.lens[b:bucket].fill_(1)
        self.live[:b].fill_(1)
        self.live[b:].zero_()

    def _load_sampling(self, b: int, rows: RowParams, column: int) -> None:
        """Copies the rows' parameters and uniform table into the static buffers when they changed,
        and the column when the device counter does not hold it: nothing on a steady step."""
        if rows is not self.loaded_rows:
            for static, value, pad in ((self.temperature, rows.temperature, 1.0), (self.top_k, rows.top_k, 0),
                                       (self.top_p, rows.top_p, 1.0)):
                static[:b].copy_(value)
                static[b:].fill_(pad)
            self.loaded_rows, self.loaded_table = rows, None
        if rows.ahead is not self.loaded_table:
            self.uniforms[:b].copy_(rows.ahead)
            self.uniforms[b:].fill_(0.5)
            self.loaded_table = rows.ahead
        if column != self.next_column:
            self.column.fill_(column)
        self.next_column = column + 1

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
