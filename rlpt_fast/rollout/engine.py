"""Engine: generate completions for many prompts at once, in the trainer's own process and weights.

    engine = Engine(model)                       # every argument has a default that works on CPU
    outs = engine.generate([Request(ids, pixel_values, image_grid_thw), ...],
                           SamplingParams(n=8, temperature=1.0, max_tokens=256))
    outs[i][j].token_ids, outs[i][j].logprobs, outs[i][j].finish_reason

Each prompt is prefilled ONCE and forked into its n samples, which share the prompt's KV blocks
(and, in decode, read them once per step for the whole group: cascade_attention.py). All sequences
of all prompts are decoded together (continuous batching). The model runs in eval mode (no
dropout) under no_grad for the call (decode steps without CUDA graphs under inference_mode: they
make no tensor that outlives the call) and is put back as it was. The engine holds no global state:
several engines on one model are allowed (each has its own cache).

LoRA: each generate call (and each CUDA graph capture) first refreshes every adapter's inference
cache in place (lora.pinned_lora_caches: A and scaling * B in the activations' dtype; a packed
group's stacked A in rows reserved after its weights, so its adapters add 1 kernel to its GEMM) and
pins it for the call. A graph replay runs no Python and so checks nothing:
this refresh is what makes the next generate after an optimizer step use the new adapter weights.
Capture runs in eval mode too, so an engine built on a model in train mode records no LoRA dropout.

Packed projections (EngineConfig.pack_projections): building an engine moves each decoder layer's
q/k/v weights into one tensor and its gate/up weights into another (the same Parameter objects,
values unchanged; model/packed_linear.py), so a decode step runs 2 GEMMs where it ran 5 per layer;
with LoRA every such group, and o_proj and down_proj alone, also gets rows for its adapters' A.
The optimizer keeps updating those tensors in place; `recapture` packs again after parameters were
replaced.

engine.stats (running totals): prefill_tokens (tokens computed by prefill, recomputation after
preemption included, prefix-cache hits excluded), decode_tokens, preemptions, generated_tokens,
prefill_steps / decode_steps and prefill_seconds / decode_seconds (host clock; each step ends with
its host sync), prefix_cache_hit_tokens.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager

import torch

from rlpt_fast.model.lora import pinned_lora_caches
from rlpt_fast.model.packed_linear import pack_projections
from rlpt_fast.rollout.block_manager import BlockManager
from rlpt_fast.rollout.config import EngineConfig
from rlpt_fast.rollout.model_runner import ModelRunner
from rlpt_fast.rollout.params import Completion, Request, SamplingParams
from rlpt_fast.rollout.scheduler import Scheduler, SchedulerConfig
from rlpt_fast.rollout.sequence import ImageSpan, Sequence, StopRule


class Engine:
    def __init__(self, model: torch.nn.Module, **config) -> None:
        """config: the fields of EngineConfig (block_size, num_blocks, max_num_seqs, ...)."""
        self.config = EngineConfig(**config)
        self.model = model
        if self.config.pack_projections:
            pack_projections(model)  # before any graph is captured over the weights
        with self._inference():  # the runner captures CUDA graphs over the LoRA caches
            self.runner = ModelRunner(model, self.config)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   self.config.max_model_len, self.config.enable_chunked_prefill),
                                   self.block_manager)
        self.eos_token_ids = frozenset(model.config.eos_token_ids)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "generated_tokens": 0,
                      "prefill_steps": 0, "decode_steps": 0, "prefix_cache_hit_tokens": 0,
                      "prefill_seconds": 0.0, "decode_seconds": 0.0}

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def recapture(self) -> None:
        """Re-record the decode CUDA graphs (after parameters were replaced, not updated in place),
        packing the projections again first (replacing their data unpacked them)."""
        if self.config.pack_projections:
            pack_projections(self.model)
        if self.runner.graphs is not None:
            with self._inference():
                self.runner.graphs.capture()

    @contextmanager
    def _inference(self):
        """Eval mode, no_grad, LoRA caches refreshed in place and pinned; the mode is put back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), pinned_lora_caches(self.model):
                yield
        finally:
            self.model.train(was_training)

    def generate(self, requests: list[Request], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[Completion]]:
        """For each request, params.n completions (ordered by sample index). If the call raises
        (bad input, or an error in a step), it leaves no sequence behind: the next call starts clean."""
        requests, plist = _as_lists(requests, params)
        try:
            with self._inference():  # refreshes the LoRA caches the CUDA graphs read: see the docstring
                return self._generate(requests, plist)
        finally:
            self.scheduler.abort()  # (nothing left after a call that returns)
            self.runner.clear_requests()

    def _generate(self, requests: list[Request], plist: list[SamplingParams]) -> list[list[Completion]]:
        if not self.config.prefix_cache_across_calls:
            self.reset_prefix_cache()
        for i, (req, p) in enumerate(zip(requests, plist)):
            self._check_request(i, req)
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            try:  # (the model checks the images against their placeholder tokens)
                self.runner.add_request(i, req, p, seed)
            except ValueError as e:
                raise ValueError(f"request {i}: {e}") from e
        for i, (req, p) in enumerate(zip(requests, plist)):
            self.scheduler.add(self._sequence(i, req, p))
        done: list[Sequence] = []
        while not self.scheduler.is_finished():
            done += self.step()
        out: list[list[Completion]] = [[None] * p.n for p in plist]
        for seq in done:
            out[seq.request_index][seq.sample_index] = Completion(
                seq.completion_token_ids, seq.logprobs, seq.finish_reason)
        return out

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prompt block (their K/V came from the weights of the time). generate
        does it at every call unless EngineConfig.prefix_cache_across_calls; call it after changing
        the weights when that is set."""
        self.block_manager.reset_prefix_cache()

    def _check_request(self, i: int, req: Request) -> None:
        """What Request cannot check alone: the prompt against max_model_len and the vocabulary."""
        if len(req.input_ids) >= self.config.max_model_len:
            raise ValueError(f"request {i}: prompt of {len(req.input_ids)} tokens leaves no room under "
                             f"max_model_len={self.config.max_model_len}")
        vocab = self.model.config.vocab_size
        top = max(req.input_ids)
        if top >= vocab:
            raise ValueError(f"request {i}: token id {top} at index {req.input_ids.index(top)} is not below "
                             f"vocab_size {vocab}")

    def _sequence(self, index: int, req: Request, p: SamplingParams) -> Sequence:
        stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        spans = _image_spans(req, self.model.config.image_token_id) if self.config.enable_prefix_caching else ()
        return Sequence(list(req.input_ids), len(req.input_ids), StopRule(p.max_tokens, stops, self.config.max_model_len),
                        request_index=index, num_samples=p.n, image_spans=spans)

    def step(self) -> list[Sequence]:
        """One scheduled step; returns the sequences it finished. generate's inner loop: called on its
        own after the LoRA adapters changed, CUDA graphs replay the old adapters until
        rlpt_fast.model.lora.refresh_lora_caches(model) runs (generate does it)."""
        preempted = self.scheduler.num_preemptions
        hits = self.block_manager.num_hit_tokens
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        samples = self.runner.run(batch)  # ends with the step's host sync, so the clock is fair
        finished = self.scheduler.postprocess(batch, samples)
        kind = "prefill" if batch.is_prefill else "decode"
        self.stats[f"{kind}_tokens"] += batch.num_tokens
        self.stats[f"{kind}_steps"] += 1
        self.stats[f"{kind}_seconds"] += time.perf_counter() - t0
        self.stats["generated_tokens"] += sum(len(s) for s in samples)
        self.stats["preemptions"] += self.scheduler.num_preemptions - preempted
        self.stats["prefix_cache_hit_tokens"] += self.block_manager.num_hit_tokens - hits
        return finished


def _as_lists(requests, params) -> tuple[list[Request], list[SamplingParams]]:
    """generate's arguments as two lists of the same length, each item of its type."""
    requests = list(requests)
    params = params if params is not None else SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(requests)
    if len(plist) != len(requests):
        raise ValueError(f"generate got {len(requests)} requests but {len(plist)} SamplingParams")
    for name, items, kind in (("requests", requests, Request), ("params", plist, SamplingParams)):
        for i, x in enumerate(items):
            if not isinstance(x, kind):
                raise TypeError(f"generate: {name}[{i}] must be a {kind.__name__}, got {type(x).__name__}")
    return requests, plist


def _image_spans(req: Request, image_token_id: int) -> tuple[ImageSpan, ...]:
    """Each image's placeholder tokens [start, end) and a digest of its pixels and grid. An image's
    token count comes from its grid, not from a run of placeholders: two images may touch, and
    each must keep its own digest (else a prompt that differs in the second image hits the cache)."""
    at = [i for i, t in enumerate(req.input_ids) if t == image_token_id]
    if req.pixel_values is None or not at:
        return ()
    sizes = req.image_grid_thw.prod(-1).tolist()
    per_token = sum(sizes) // len(at)  # patches per placeholder (merge**2; add_request checked the counts)
    pixels = req.pixel_values.detach().cpu().contiguous().split(sizes)
    spans, used = [], 0
    for px, grid, size in zip(pixels, req.image_grid_thw.tolist(), sizes):
        h = hashlib.sha256(px.view(torch.uint8).numpy())  # the buffer itself, no bytes copy
        h.update(repr(grid).encode())
        n = size // per_token
        spans.append(ImageSpan(at[used], at[used + n - 1] + 1, h.digest()))
        used += n
    return tuple(spans)
