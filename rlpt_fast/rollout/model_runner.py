"""The only part of the engine that touches tensors: builds each step's inputs from the scheduled
sequences, runs the model on the paged KV cache, samples.

Per step it builds (on the host, from Python lists, then one copy each to the device):
  prefill: the chunk's token ids, M-RoPE positions (the prompt's from model.rope_positions; a
           token t past the prompt sits at t + delta on all axes), the cache slot of every new
           token, each sequence's context slots, and the image embeddings of the chunk's image
           tokens (each request's images are encoded once per generate call);
  decode:  the last token of each sequence, its position, its slot, the block tables (rebuilt
           only when they change), the context lengths and the grouping of rows that share
           prompt blocks (cascade decode). While the same sequences keep decoding and no table
           changes (a "steady" step), the inputs advance in place on the device (the sampled
           tokens, positions/slots/lengths + 1) and the sampling parameters are reused: a CPU step
           is then a few hundred small ops, run under inference mode. On the GPU the forward AND
           the sampling are replayed from CUDA graphs (cuda_graphs.py), whose sampler graph also
           advances the static inputs: a steady GPU step is two replays and the host sync.
The model's parameters are used as they are (LoRA included): nothing is copied, so the next step
after an optimizer step sees the new weights.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rlpt_fast.rollout.attention import DecodeMeta, choose_backend, paged_attention
from rlpt_fast.rollout.cascade_attention import build_cascade, prefix_groups
from rlpt_fast.rollout.cascade_torch import carry_dense_kv
from rlpt_fast.rollout.config import EngineConfig
from rlpt_fast.rollout.decode_attention import choose_num_splits
from rlpt_fast.rollout.kv_cache import count_blocks
from rlpt_fast.rollout.params import Request, SamplingParams
from rlpt_fast.rollout.prefill_attention import PrefillMeta
from rlpt_fast.rollout.sampler import RowParams, pack_samples
from rlpt_fast.rollout.scheduler import Batch
from rlpt_fast.rollout.sequence import Sequence


@dataclass
class RequestState:
    """What the runner keeps per request of the current generate call."""
    positions: torch.Tensor            # (3, T) M-RoPE positions of the prompt, on the device
    delta: int
    image_embeds: torch.Tensor | None  # (M, H) rows of the prompt's image tokens, in order
    image_cumsum: list[int]            # image tokens among the first i prompt tokens, i = 0..T
    params: SamplingParams
    seed: int


class ModelRunner:
    def __init__(self, model: torch.nn.Module, config: EngineConfig) -> None:
        self.model, self.config = model, config
        mc = model.config
        self.num_layers, self.num_kv_heads, self.head_dim = mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim
        self.image_token_id = mc.image_token_id
        # the decoder's own device/dtype (the contract's module tree; a vision tower may differ)
        embed = model.model.language_model.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        self.backend = choose_backend(self.device, config.attention_backend)
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.on_cuda else 1
        self.requests: dict[int, RequestState] = {}
        self._tables_host: list[list[int]] = []
        self._tables_dev = torch.empty(0, 0, dtype=torch.int32)
        self._tables_changed = True
        self._cascade = None  # the shared-prefix grouping, rebuilt when block tables change
        self._groups = None   # its Triton form
        self._row_key, self._rows = None, None  # sampling parameters of the last batch's rows
        # the last decode step's inputs, its sequences (None: the next step rebuilds) and samples
        self._inputs, self._inputs_ids, self._last_tokens = None, None, None
        self.num_blocks = count_blocks(model, config, self.block_bytes, self.device)
        self.kv_cache = torch.zeros(2, self.num_layers, self.num_blocks, config.block_size, self.num_kv_heads,
                                    self.head_dim, dtype=self.dtype, device=self.device)
        self.graphs = None
        if config.cuda_graphs if config.cuda_graphs is not None else self.on_cuda:
            from rlpt_fast.rollout.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_layers * self.config.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, index: int, request: Request, params: SamplingParams, seed: int) -> None:
        ids = torch.tensor(request.input_ids, dtype=torch.long)
        grid = request.image_grid_thw
        positions, delta = self.model.rope_positions(ids, grid)
        embeds = None
        if request.pixel_values is not None:
            # host pixels: encode_images hashes them where they are and moves only unseen images
            embeds = self.model.encode_images(request.pixel_values, grid)
        cumsum = [0, *(ids == self.image_token_id).cumsum(0).tolist()]
        if cumsum[-1] != (0 if embeds is None else embeds.shape[0]):  # else prefill fails, mid-call
            raise ValueError(f"{cumsum[-1]} image tokens but its images give "
                             f"{0 if embeds is None else embeds.shape[0]} embeddings")
        self.requests[index] = RequestState(positions.to(self.device), delta, embeds, cumsum, params, seed)

    def clear_requests(self) -> None:
        self.requests.clear()
        self._row_key, self._rows = None, None
        self._inputs, self._inputs_ids, self._last_tokens = None, None, None
        self._tables_host, self._cascade = [], None

    # -- one step ---------------------------------------------------------------------------
    def run(self, batch: Batch) -> list[list[tuple[int, float]]]:
        """Returns, per scheduled sequence, batch.num_samples[i] (token, logprob) pairs."""
        if batch.copies:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*batch.copies))
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        if batch.is_prefill:
            logits = self._prefill(batch)
            if logits is None:
                return [[] for _ in batch.seqs]
            positions = [s.num_tokens for s, k in zip(batch.seqs, batch.num_samples) for _ in range(k)]
            sampled = pack_samples(*self.backend.sample(logits, self._row_params(batch).at(positions)))
        else:
            # Eager decode (no CUDA graphs: the CPU) is a few hundred tiny ops per step, and
            # inference mode takes the autograd bookkeeping off each (~12% of a CPU step). Only
            # decode: prefill encodes the images that the trainer's forward reuses (they must
            # stay normal tensors), and every tensor a decode step makes lives in the runner.
            # (not inference_mode(False) for the graphs: that turns grad mode back on)
            with torch.inference_mode() if self.graphs is None else nullcontext():
                sampled = self._decode(batch)
        self._last_tokens = sampled[:, 0]
        pairs = [(int(t), lp) for t, lp in sampled.cpu().tolist()]  # the step's one host sync
        if not batch.is_prefill:  # one sample per sequence
            return [[pair] for pair in pairs]
        out, i = [], 0
        for k in batch.num_samples:
            out.append(pairs[i:i + k])
            i += k
        return out

    def _row_params(self, batch: Batch) -> RowParams:
        """The rows' fixed sampling parameters, rebuilt only when the batch's sequences change
        (sequence ids are never reused); a step adds the positions (RowParams.at / column)."""
        key = ([s.seq_id for s in batch.seqs], batch.num_samples)
        if key != self._row_key:
            rows = []
            for seq, k in zip(batch.seqs, batch.num_samples):
                st = self.requests[seq.request_index]
                p = st.params
                rows += [(p.temperature, p.top_k, p.top_p, st.seed, seq.sample_index + j) for j in range(k)]
            self._row_key, self._rows = key, RowParams.from_rows(rows, self.device)
        return self._rows

    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.config.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def _prefill(self, batch: Batch) -> torch.Tensor | None:
        self._tables_host = []  # the next decode rebuilds its grouping (and the copies it keeps)
        self._inputs_ids = None  # and its inputs: the running sequences did not move this step
        ids, pos, slots, ctx_slots, image_rows, cu, last_rows = [], [], [], [], [], [0], []
        for seq, chunk, k in zip(batch.seqs, batch.chunk_lens, batch.num_samples):
            st = self.requests[seq.request_index]
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + chunk
            ids += seq.token_ids[start:end]
            pos.append(self._positions(st, start, end))
            slots += [self._slot(seq, p) for p in range(start, end)]
            ctx_slots.append(torch.tensor([self._slot(seq, p) for p in range(end)]) if start else None)
            image_rows += self._image_rows(st, seq, start, end)
            cu.append(cu[-1] + chunk)
            last_rows += [cu[-1] - 1] * k
        dev = self.device
        ids_t = torch.tensor(ids, device=dev)
        meta = PrefillMeta(cu, [s.num_cached_tokens for s in batch.seqs],
                           [None if c is None else c.to(dev) for c in ctx_slots])
        slot_t = torch.tensor(slots, device=dev)
        embeds = self.model.embed(ids_t, torch.cat(image_rows) if image_rows else None)
        attn = paged_attention(self.kv_cache, self.backend, None, meta, slot_t)
        hidden = self.model.forward_hidden(embeds, torch.cat(pos, dim=1), attn)
        if not last_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(last_rows, device=dev)])

    def _positions(self, st: RequestState, start: int, end: int) -> torch.Tensor:
        t = st.positions.shape[1]
        parts = [st.positions[:, start:min(end, t)]]
        if end > t:  # completion tokens of a recomputed sequence
            parts.append((torch.arange(max(start, t), end, device=self.device) + st.delta).expand(3, -1))
        return torch.cat(parts, dim=1)

    def _image_rows(self, st: RequestState, seq: Sequence, start: int, end: int) -> list[torch.Tensor]:
        """Embedding rows for the image tokens among tokens [start, end) of seq, in order."""
        t = len(st.image_cumsum) - 1
        rows = []
        lo, hi = st.image_cumsum[min(start, t)], st.image_cumsum[min(end, t)]
        if hi > lo:
            rows.append(st.image_embeds[lo:hi])
        generated = seq.token_ids[max(start, t):end].count(self.image_token_id)
        if generated:  # a sampled image-pad token is a plain token (as in transformers' generate)
            rows.append(self._plain_image_row().expand(generated, -1))
        return rows

    def _plain_image_row(self) -> torch.Tensor:
        ids = torch.tensor([self.image_token_id], device=self.device)
        return self.model.model.language_model.embed_tokens(ids)

    def _decode(self, batch: Batch) -> torch.Tensor:
        """One decode step: each sequence's next token and its log-prob, (B, 2) float64 on the
        device (pack_samples). On CUDA graphs the forward and the sampling are replayed; eagerly,
        the logits are sampled with the same sampler."""
        seqs, bs = batch.seqs, self.config.block_size
        lens = [s.num_tokens for s in seqs]
        ids = [s.seq_id for s in seqs]
        same_rows, self._inputs_ids = ids == self._inputs_ids, ids  # the previous step ran these sequences
        tables = self._block_tables(seqs)
        steady = same_rows and not self._tables_changed  # every row one token further, in its block
        cascade = self._cascade_for(seqs, lens, same_rows)
        rows = self._row_params(batch)
        if self.graphs is not None and self.graphs.fits(len(seqs)):
            # a steady step's inputs are in the graphs' static buffers already (advanced there)
            advanced = steady and self.graphs.advanced_rows == len(seqs)
            return self.graphs.run(None if advanced else self._decode_inputs(seqs, lens, False), tables, cascade,
                                   rows, lens)
        inputs = self._decode_inputs(seqs, lens, steady)
        meta = DecodeMeta(inputs[2], tables, inputs[3].int(),
                          choose_num_splits(len(seqs), self.num_kv_heads, max(lens), self.num_sms),
                          tables.shape[1] * bs, padded=False)
        if cascade is not None and self.backend.name == "torch":
            meta.cascade = cascade
        elif cascade is not None:
            meta.groups = self._groups
        return pack_samples(*self.backend.sample(self.decode_logits(inputs[0], inputs[1].expand(3, -1), meta), rows.at(lens)))

    def _decode_inputs(self, seqs: list[Sequence], lens: list[int], steady: bool) -> torch.Tensor:
        """(4, B) int64 on the device: token ids, positions, slots, context lengths. On a steady
        step (the same sequences ran the previous step, a decode step, and no block table changed)
        every row moved one token within its block: the previous tensor plus one, and the sampled
        tokens (still on the device) as ids; nothing is built on the host."""
        if steady:
            self._inputs[1:].add_(1)
            self._inputs[0].copy_(self._last_tokens)
            return self._inputs
        rows = [[s.last_token for s in seqs], [n - 1 + self.requests[s.request_index].delta for s, n in zip(seqs, lens)],
                [self._slot(s, n - 1) for s, n in zip(seqs, lens)], lens]
        inputs = torch.tensor(rows)
        self._inputs = (inputs.pin_memory() if self.on_cuda else inputs).to(self.device, non_blocking=True)
        return self._inputs

    def _cascade_for(self, seqs: list[Sequence], lens: list[int], same_rows: bool):
        """The shared-prefix grouping of this decode batch (None: nothing shared, or turned off),
        rebuilt only when the block tables changed (see _block_tables). For the same rows the
        torch path carries its dense K/V copies over to the new grouping where they still hold."""
        if not self.config.cascade_decode:
            return None
        if self._tables_changed:  # (a batch that shares nothing keeps None until its tables change)
            old = self._cascade
            self._cascade = build_cascade([s.block_table for s in seqs], lens, self.config.block_size, self.device)
            if same_rows and old is not None and self._cascade is not None and self.backend.name == "torch":
                carry_dense_kv(old, self._cascade)
            if self._cascade is not None and self.backend.name == "triton":
                group = self.model.config.num_attention_heads // self.num_kv_heads
                self._groups = prefix_groups(self._cascade, group, self.num_kv_heads, self.num_sms)
        elif self._cascade is not None and self.backend.name == "torch":  # (Triton reads the context lengths)
            self._cascade = self._cascade.with_lens(lens)
        return self._cascade

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """(B, W) int32 on the device. Tables change only when a sequence crosses into a new block
        (or copies one on write), so most steps reuse the previous tensor: no rebuild, no copy."""
        tables = [s.block_table for s in seqs]
        self._tables_changed = tables != self._tables_host  # a C-level list comparison, microseconds
        if self._tables_changed:
            self._tables_host = [list(t) for t in tables]
            width = max(map(len, tables))
            padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
            self._tables_dev = (padded.pin_memory() if self.on_cuda else padded).to(self.device, non_blocking=True)
        return self._tables_dev

    def decode_logits(self, ids: torch.Tensor, positions: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
        """One decode forward (B tokens) -> logits (B, V). No host sync: CUDA graphs capture this."""
        # embed_tokens directly: model.embed counts image tokens on the host, and a sampled
        # image-pad token is a plain token anyway.
        embeds = self.model.model.language_model.embed_tokens(ids)
        attn = paged_attention(self.kv_cache, self.backend, meta, None, meta.slot_mapping)
        return self.model.compute_logits(self.model.forward_hidden(embeds, positions, attn))
