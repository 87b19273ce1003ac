"""Continuous batching over the paged cache. Pure Python (no torch).

Each step is either a prefill step or a decode step:
- prefill: chunks of admitted-but-uncomputed sequences, at most `max_num_batched_tokens` tokens
  in all; a long (multimodal) prompt is cut into chunks over several steps. Prefill goes first so
  new prompts join the decode batch as early as possible.
- decode: one token for each running sequence (at most `max_num_seqs`). When a sequence needs a
  block and none is free, the most recently admitted sequence is preempted: its blocks are freed
  and it goes back to the front of the queue with all its tokens, to be recomputed (prefilled)
  when blocks free up. No sequence is ever dropped.

After the step, `postprocess` appends the sampled tokens, forks a finished prompt into its n
samples, and retires finished sequences.

The per-step decode bookkeeping (schedule_decode, the decode postprocess) has a C++ twin in
csrc/host_path.cpp that acts on the same objects; SchedulerConfig.host_path / $RLPT_HOST_PATH
picks (host_path.py). Prefill, forks, preemption, retiring and prefix-cache hashing stay here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rlpt_fast.rollout import host_path
from rlpt_fast.rollout.block_manager import BlockManager
from rlpt_fast.rollout.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    host_path: str = field(default_factory=host_path.default_mode)  # python | native | auto

    def __post_init__(self) -> None:
        host_path.resolve(self.host_path)  # fails here, naming the field, if it cannot be served
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({self.max_num_batched_tokens} < {self.max_model_len})")


@dataclass
class Batch:
    """One step's work. chunk_lens[i]: tokens of seqs[i] computed this step (1 in decode);
    num_samples[i]: tokens to sample from its last position (0: prompt not done yet)."""
    seqs: list[Sequence]
    is_prefill: bool
    chunk_lens: list[int]
    num_samples: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.chunk_lens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._native = host_path.resolve(config.host_path)  # None: the Python path below

    def add(self, seq: Sequence) -> None:
        longest = min(seq.stop.max_model_len, self.config.max_model_len, seq.num_prompt_tokens + seq.stop.max_tokens)
        needed = -(-longest // self.blocks.block_size)
        if needed > len(self.blocks.blocks):
            raise ValueError(f"request {seq.request_index}: a sequence of up to {longest} tokens needs "
                             f"{needed} blocks but the cache has only {len(self.blocks.blocks)}: raise "
                             "num_blocks or lower max_model_len")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self) -> None:
        """Drops every unfinished sequence and frees its blocks (a generate call that raised)."""
        for seq in (*self.prefilling, *self.running):
            self.blocks.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.waiting.clear()
        self.prefilling.clear()
        self.running.clear()

    def is_finished(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    def _num_seq_slots(self) -> int:
        return len(self.running) + sum(s.num_samples for s in self.prefilling)

    def schedule(self) -> Batch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        batch = self._schedule_decode()
        if not batch.seqs:
            raise RuntimeError("scheduler has work but could schedule nothing (cache too small?)")
        return batch

    def _schedule_prefill(self) -> Batch:
        batch = Batch([], True, [], [])
        budget = self.config.max_num_batched_tokens
        for seq in self.prefilling:
            if budget == 0:
                break
            budget -= self._add_chunk(batch, seq, budget)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self._num_seq_slots() + seq.num_samples > self.config.max_num_seqs and self._num_seq_slots() > 0:
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.PREFILLING
            self.prefilling.append(seq)
            budget -= self._add_chunk(batch, seq, budget)
        return batch

    def _add_chunk(self, batch: Batch, seq: Sequence, budget: int) -> int:
        chunk = min(seq.num_uncomputed_tokens, budget)
        batch.seqs.append(seq)
        batch.chunk_lens.append(chunk)
        batch.num_samples.append(seq.num_samples if chunk == seq.num_uncomputed_tokens else 0)
        return chunk

    def _schedule_decode(self) -> Batch:
        if self._native is not None:
            return self._schedule_decode_native()
        seqs, copies, blocks = [], [], self.blocks
        while self.running and len(seqs) < self.config.max_num_seqs:
            seq = self.running.popleft()
            while not blocks.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                copies += blocks.append_slot(seq)
                seqs.append(seq)
        self.running.extendleft(reversed(seqs))
        return Batch(seqs, False, [1] * len(seqs), [1] * len(seqs), copies)

    def _schedule_decode_native(self) -> Batch:
        """Same as the Python loop above; C++ walks the running list, preemption calls back."""
        items = list(self.running)
        seqs, copies, lo, hi = self._native.schedule_decode(items, self.config.max_num_seqs, self.blocks,
                                                            self._preempt)
        self.running.clear()
        self.running.extend(seqs)
        self.running.extend(items[lo:hi])
        return Batch(seqs, False, [1] * len(seqs), [1] * len(seqs), copies)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: Batch, samples: list[list[tuple[int, float]]]) -> list[Sequence]:
        """samples[i]: batch.num_samples[i] (token, logprob) pairs. Returns the finished sequences."""
        if not batch.is_prefill and self._native is not None:
            return self._native.postprocess_decode(batch.seqs, samples, self.blocks, self._retire)
        if not batch.is_prefill:
            return self._postprocess_decode(batch, samples)
        finished = []
        for seq, chunk, sampled in zip(batch.seqs, batch.chunk_lens, samples):
            seq.num_cached_tokens += chunk
            self.blocks.commit(seq)
            if not sampled:  # a chunk of a prompt that is not done yet
                continue
            self.prefilling.remove(seq)
            children = self._fork(seq, len(sampled))
            self.running.extend(children)
            for child, (token, logprob) in zip(children, sampled):
                child.append(token, logprob)
                if child.check_finished():
                    finished.append(self._retire(child))
        return finished

    def _postprocess_decode(self, batch: Batch, samples: list[list[tuple[int, float]]]) -> list[Sequence]:
        """postprocess of a decode step (one token per sequence), in one loop: this runs every step."""
        finished, commit = [], self.blocks.enable_prefix_caching
        for seq, ((token, logprob),) in zip(batch.seqs, samples):
            seq.num_cached_tokens += 1
            if commit:
                self.blocks.commit(seq)
            seq.append(token, logprob)
            if seq.check_finished():
                finished.append(self._retire(seq))
        return finished

    def _fork(self, seq: Sequence, n: int) -> list[Sequence]:
        seq.status = SequenceStatus.RUNNING
        if n == 1:
            return [seq]
        children = [seq.fork(i) for i in range(n)]
        self.blocks.fork(seq, children)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        return children

    def _retire(self, seq: Sequence) -> Sequence:
        self.blocks.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        return seq
