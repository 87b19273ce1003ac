"""Scheduler with a fake model: every sequence finishes with the tokens it would have produced
alone, whatever the batching, chunking and preemption; budgets and caps hold at every step."""
import pytest

from rlpt_fast.rollout.block_manager import BlockManager
from rlpt_fast.rollout.scheduler import Scheduler, SchedulerConfig
from rlpt_fast.rollout.sequence import Sequence, SequenceStatus, StopRule


def fake_token(seq: Sequence, sample_index: int) -> int:
    # depends only on the sequence's own history, like a real model + keyed sampler
    return (sum(seq.token_ids) * 31 + seq.num_tokens * 7 + sample_index * 13) % 50 + 1


def run(sched: Scheduler, check=lambda batch: None):
    done = []
    while not sched.is_finished():
        batch = sched.schedule()
        check(batch)
        for seq, chunk in zip(batch.seqs, batch.chunk_lens):
            assert seq.num_cached_tokens + chunk <= seq.num_tokens
            assert len(seq.block_table) * sched.blocks.block_size >= seq.num_tokens
        samples = [[(fake_token(s, s.sample_index + i), -0.5) for i in range(k)]
                   for s, k in zip(batch.seqs, batch.num_samples)]
        done += sched.postprocess(batch, samples)
    return done


def expected(prompt, n, max_tokens, stop_ids=frozenset()):
    out = []
    for i in range(n):
        s = Sequence(list(prompt), len(prompt), StopRule(max_tokens, stop_ids))
        while True:
            s.append(fake_token(s, i), -0.5)
            if s.check_finished():
                break
        out.append((s.completion_token_ids, s.finish_reason))
    return out


def make(num_blocks, block_size=4, **cfg):
    config = SchedulerConfig(**cfg)
    return Scheduler(config, BlockManager(num_blocks, block_size))


@pytest.mark.parametrize("num_blocks", [200, 14])  # 14: forces preemption
def test_all_sequences_complete_identically_with_and_without_preemption(num_blocks):
    sched = make(num_blocks, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=40)
    prompts = [[3] * 9, [5, 6] * 7, [1, 2, 3]]
    ns = [3, 1, 4]
    for r, (p, n) in enumerate(zip(prompts, ns)):
        sched.add(Sequence(list(p), len(p), StopRule(12, frozenset({17})), request_index=r, num_samples=n))

    def check(batch):
        assert batch.num_tokens <= 16
        assert len(batch.seqs) <= 8
        assert all(c == 1 for c in batch.chunk_lens) or batch.is_prefill

    done = run(sched, check)
    assert sched.blocks.num_free_blocks == num_blocks
    assert all(s.status is SequenceStatus.FINISHED for s in done)
    for r, (p, n) in enumerate(zip(prompts, ns)):
        got = sorted((s.sample_index, s.completion_token_ids, s.finish_reason) for s in done if s.request_index == r)
        want = [(i, *e) for i, e in enumerate(expected(p, n, 12, frozenset({17})))]
        assert got == want
    assert (sched.num_preemptions > 0) == (num_blocks == 14)


def test_long_prompt_is_chunked_and_prefilled_once_for_its_group():
    sched = make(100, max_num_batched_tokens=8, max_model_len=64)
    sched.add(Sequence([1] * 30, 30, StopRule(2), num_samples=5))
    chunks, prefill_tokens = [], 0
    while not sched.is_finished():
        batch = sched.schedule()
        if batch.is_prefill:
            chunks.append(batch.chunk_lens)
            prefill_tokens += batch.num_tokens
            assert batch.num_samples == [5 if sum(sum(c) for c in chunks) == 30 else 0]
        sched.postprocess(batch, [[(9, 0.0)] * k for k in batch.num_samples])
    assert chunks == [[8], [8], [8], [6]] and prefill_tokens == 30


def test_sequence_too_long_for_cache_is_refused_up_front():
    sched = make(3, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="blocks but the cache has only 3"):
        sched.add(Sequence([1] * 5, 5, StopRule(100, max_model_len=64)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)


def test_abort_frees_every_block_of_shared_and_chunked_sequences():
    sched = make(40, max_num_batched_tokens=6, max_model_len=64)
    sched.add(Sequence([1] * 9, 9, StopRule(10), request_index=0, num_samples=3))
    sched.add(Sequence([2] * 14, 14, StopRule(10), request_index=1))
    sched.add(Sequence([3] * 5, 5, StopRule(10), request_index=2))
    for _ in range(3):  # request 0 forked and decoding, request 1 part-way through its chunks
        batch = sched.schedule()
        sched.postprocess(batch, [[(9, 0.0)] * k for k in batch.num_samples])
    assert sched.running and sched.prefilling and sched.blocks.num_free_blocks < 40
    sched.abort()
    assert sched.is_finished() and sched.blocks.num_free_blocks == 40
    assert all(b.ref_count == 0 for b in sched.blocks.blocks)
