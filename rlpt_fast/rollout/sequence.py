"""One sequence as the scheduler and block manager see it: token ids and cache bookkeeping.

Pure Python (no torch), so scheduling and block accounting are unit-testable without a model.

A request with n > 1 first lives as ONE sequence (the "parent", num_samples = n): its prompt is
prefilled once, then it is forked into n children (num_samples = 1, sample_index 0..n-1) that
share the prompt's cache blocks. A child's sample_index and each token's position are what the
sampler's random stream is keyed on, so a child samples the same tokens whatever it is batched
with, and after a preemption it resamples exactly what it would have sampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count


class SequenceStatus(Enum):
    WAITING = auto()     # not holding cache blocks (new, or preempted: recomputed from scratch)
    PREFILLING = auto()  # holding blocks for all its tokens, some not yet computed
    RUNNING = auto()     # decoding: every token but the last has its K/V in the cache
    FINISHED = auto()


@dataclass(frozen=True)
class StopRule:
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30


@dataclass(frozen=True)
class ImageSpan:
    """Tokens [start, end) of a prompt are one image's placeholders; digest hashes its pixels."""
    start: int
    end: int
    digest: bytes


_ids = count()


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]
    num_prompt_tokens: int
    stop: StopRule
    request_index: int = 0
    sample_index: int = 0
    num_samples: int = 1
    image_spans: tuple[ImageSpan, ...] = ()
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0   # tokens whose K/V are written in the cache
    num_hashed_blocks: int = 0   # leading blocks registered in the prefix cache
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.num_prompt_tokens <= len(self.token_ids):
            raise ValueError(f"sequence {self.seq_id}: num_prompt_tokens {self.num_prompt_tokens} "
                             f"not in 1..{len(self.token_ids)}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    def num_blocks_needed(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def append(self, token: int, logprob: float) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)

    def fork(self, sample_index: int) -> Sequence:
        """A child that shares nothing mutable with this sequence (blocks are the block manager's)."""
        return Sequence(list(self.token_ids), self.num_prompt_tokens, self.stop, self.request_index,
                        sample_index, 1, self.image_spans, status=self.status,
                        num_cached_tokens=self.num_cached_tokens, num_hashed_blocks=self.num_hashed_blocks,
                        logprobs=list(self.logprobs))

    def check_finished(self) -> bool:
        """Sets finish_reason when the last token ends the sequence."""
        if self.num_completion_tokens == 0:
            return False
        if self.last_token in self.stop.stop_token_ids:
            self.finish_reason = "stop"
        elif self.num_completion_tokens >= self.stop.max_tokens or self.num_tokens >= self.stop.max_model_len:
            self.finish_reason = "length"
        return self.finish_reason is not None
