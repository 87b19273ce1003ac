"""Sampling the next token of every sequence in a batch, on the device, without host syncs.

For each row: logits / temperature, then top-k (keep tokens whose logit is >= the k-th largest;
ties at the threshold are kept) and top-p (keep the smallest head of the sorted distribution whose
mass reaches p, again closed under ties), renormalize, draw. The reported log-prob is that of the
drawn token under this final distribution. temperature 0 is greedy (argmax; the log-prob is then
the plain log-softmax at temperature 1, no filters).

The draw is by inverse CDF over the vocabulary in its natural order, with ONE uniform per row that
is a hash of (seed, sample_index, position): counter-based, so a sequence draws the same token
whatever it is batched with, whether the batch needed sorting, or whether it was preempted and
recomputed. The keys are host values, so the hash runs on the host (numpy, a few microseconds for
a whole batch) and its uniforms travel to the device with the other per-row parameters.
sampler_triton.py draws the same way in one launch for batches without top-k / top-p (the
engine's Triton backend picks it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_M32 = np.uint64(0xFFFFFFFF)


@dataclass
class SamplingTensors:
    """Per row (R,): temperature f32 (0 = greedy), top_k int64 (0 = off), top_p f32 (1 = off),
    u f32: the row's uniform in (0, 1) (see `uniform`). Host bools: `filtered`, some sampled row
    uses top-k or top-p (the batch needs a sort); `greedy` / `sampled`, some row is / is not greedy
    (so an all-greedy or all-sampled batch skips the other path); `scaled`, some sampled row has a
    temperature other than 1 (else the logits are not divided)."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    u: torch.Tensor
    filtered: bool
    greedy: bool = True
    sampled: bool = True
    scaled: bool = True

    @classmethod
    def from_rows(cls, rows: list[tuple[float, int, float, int, int, int]], device) -> SamplingTensors:
        """rows: (temperature, top_k, top_p, seed, sample_index, position) per row."""
        return RowParams.from_rows([r[:5] for r in rows], device).at([r[5] for r in rows])


@dataclass
class RowParams:
    """What stays fixed for a row while a batch keeps its sequences: its filters on the device and
    the key of its random stream (seed and sample index hashed, see `row_keys`). A decode step only
    adds each row's position (`at`), so the engine builds this once per batch composition."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    keys: np.ndarray
    filtered: bool
    greedy: bool
    sampled: bool
    scaled: bool
    # uniforms of the next AHEAD positions of every row, from `base` on (decode moves each row
    # one position per step: one column per step instead of hashing every step)
    base: np.ndarray | None = None
    ahead: torch.Tensor | None = None

    @classmethod
    def from_rows(cls, rows: list[tuple[float, int, float, int, int]], device) -> RowParams:
        """rows: (temperature, top_k, top_p, seed, sample_index) per row."""
        temp, top_k, top_p, seed, index = zip(*rows)
        floats = torch.from_numpy(np.array([temp, top_p], dtype=np.float32)).to(device, non_blocking=True)
        sampled = [(t, k, p) for t, k, p in zip(temp, top_k, top_p) if t != 0]
        return cls(floats[0], torch.tensor(top_k, dtype=torch.int64).to(device, non_blocking=True), floats[1],
                   row_keys(np.array(seed, dtype=np.uint64), np.array(index, dtype=np.uint64)),
                   filtered=any(k > 0 or p < 1.0 for _, k, p in sampled), greedy=len(sampled) < len(rows),
                   sampled=bool(sampled), scaled=any(t != 1.0 for t, _, _ in sampled))

    def at(self, positions: list[int]) -> SamplingTensors:
        """The step's tensors for rows at these positions (tokens so far, one per row)."""
        step = self.column(positions)
        return SamplingTensors(self.temperature, self.top_k, self.top_p, self.ahead[:, step],
                               self.filtered, self.greedy, self.sampled, self.scaled)

    def column(self, positions: list[int]) -> int:
        """The column of `ahead` (R, AHEAD) f32 that holds the uniforms of rows at these positions.
        The table is remade (a new tensor, AHEAD positions from these on) when a row left it or
        the rows did not all move by the same count since it was made."""
        pos = np.array(positions, dtype=np.uint64)
        d = pos - self.base if self.base is not None else None  # a row behind its base wraps: huge
        step = int(d[0]) if d is not None else AHEAD
        if not (step < AHEAD and (d == d[0]).all()):
            self.base, step = pos, 0
            grid = pos[:, None] + np.arange(AHEAD, dtype=np.uint64)                  # (R, AHEAD)
            u = uniform_at(np.broadcast_to(self.keys[:, None], grid.shape), grid).astype(np.float32)
            self.ahead = torch.from_numpy(u).to(self.temperature.device, non_blocking=True)
        return step


AHEAD = 64  # positions of uniforms made at once per row


def _mix32(x: np.ndarray) -> np.ndarray:
    # 32-bit lanes in uint64 with multipliers < 2^31: no product overflows
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x2C1B3C6D)) & _M32
    return x ^ (x >> np.uint64(16))


def uniform(seed: np.ndarray, sample_index: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(R,) uint64 keys -> (R,) float64 uniforms in (0, 1), a pure function of the keys."""
    return uniform_at(row_keys(seed, sample_index), position)


def row_keys(seed: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """The part of `uniform` that depends on the row alone: (R,) uint64 -> (R,) uint64 (32-bit)."""
    x = _mix32(seed & _M32)
    x = _mix32(x ^ ((seed >> np.uint64(32)) & _M32))
    return _mix32(x ^ (sample_index & _M32))


def uniform_at(keys: np.ndarray, position: np.ndarray) -> np.ndarray:
    """`uniform` from row_keys and positions: (R,) uint64 each -> (R,) float64 in (0, 1)."""
    x = _mix32(keys ^ (position & _M32))
    # the top 24 bits, centred: float32 holds them exactly, so u is never 0 or 1 on the device
    return ((_mix32(x ^ np.uint64(0x5BD1E995)) >> np.uint64(8)).astype(np.float64) + 0.5) / 2.0**24


def filter_logits(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled (R, V) float32 -> same with filtered-out tokens at -inf (top-k first, then top-p)."""
    v = scaled.shape[1]
    srt = scaled.sort(dim=-1, descending=True).values                               # (R, V)
    k = torch.where(top_k > 0, top_k.clamp(max=v), v)
    kth = srt.gather(1, (k - 1)[:, None])                                            # (R, 1)
    srt = srt.masked_fill(srt < kth, float("-inf"))
    probs = srt.softmax(-1)
    head_mass = probs.cumsum(-1) - probs      # mass strictly before each sorted token
    keep = (head_mass < top_p[:, None]).sum(-1, keepdim=True)                        # >= 1
    threshold = torch.maximum(kth, srt.gather(1, keep - 1))
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def sample(logits: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (R, V) any float dtype -> (tokens (R,) int64, logprobs (R,) float32)."""
    logits = logits.float()
    greedy = st.temperature == 0 if st.greedy else None
    scaled = logits
    if st.scaled:
        scaled = logits / (torch.where(greedy, 1.0, st.temperature) if st.greedy else st.temperature)[:, None]
    if st.filtered:  # greedy rows: no filter
        scaled = filter_logits(scaled, *((torch.where(greedy, 0, st.top_k), torch.where(greedy, 1.0, st.top_p))
                                         if st.greedy else (st.top_k, st.top_p)))
    logp = scaled.log_softmax(-1)                                                    # (R, V)
    if not st.sampled:
        tokens = logits.argmax(-1)
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
    cdf = logp.exp().cumsum(-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: stay strictly below it so a zero-mass tail
    # token can never be picked.
    x = torch.minimum(st.u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, x, right=True).clamp_(max=logits.shape[1] - 1)     # (R, 1)
    if st.greedy:
        drawn = torch.where(greedy[:, None], logits.argmax(-1, keepdim=True), drawn)
    return drawn.squeeze(1), logp.gather(1, drawn).squeeze(1)


def pack_samples(tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """tokens (R,) int64, logprobs (R,) float32 -> (R, 2) float64 on their device: what the host
    reads after a step, in one copy (token ids and float32 values are exact in float64)."""
    return torch.stack([tokens.double(), logprobs.double()], dim=1)
