"""The native host path (C++, rlpt_fast._host) leaves exactly the state the Python path leaves:
block tables, free-list order, reference counts, prefix-cache hashes, batches, copy-on-write
copies, preemptions and finished sequences in order; under the block manager property test's
random operations, random scheduler workloads, and the engine end to end on a tiny model."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpt_fast.rollout import Engine, Request, SamplingParams, host_path
from rlpt_fast.rollout.block_manager import BlockManager
from rlpt_fast.rollout.scheduler import Scheduler, SchedulerConfig
from rlpt_fast.rollout.sequence import Sequence, StopRule

pytestmark = pytest.mark.skipif(not host_path.native_available(),
                                reason=f"rlpt_fast._host not built ({host_path.native_import_error()}); CI and the dev machine build it with `pip install -e .` (needs a C++ compiler)")
native = host_path.resolve("auto")


def seq_state(s: Sequence) -> tuple:
    return ((s.request_index, s.sample_index, s.num_samples), s.status, list(s.block_table), list(s.token_ids),
            list(s.logprobs), s.num_cached_tokens, s.num_hashed_blocks, s.finish_reason)


def bm_state(bm: BlockManager) -> tuple:
    return ([(b.ref_count, b.hash) for b in bm.blocks], list(bm.free_ids), list(bm.hash_to_block.items()),
            bm.num_hit_tokens)


def sched_state(s: Scheduler) -> tuple:
    return ([seq_state(q) for q in s.waiting], [seq_state(q) for q in s.prefilling],
            [seq_state(q) for q in s.running], s.num_preemptions, bm_state(s.blocks))


ops = st.lists(st.tuples(st.sampled_from(["alloc", "fork", "append", "free", "preempt"]),
                         st.integers(0, 1000), st.integers(1, 40)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4, 16]), num_blocks=st.integers(4, 40), prefix=st.booleans())
def test_block_manager_random_operations_native_equals_python(ops, block_size, num_blocks, prefix):
    """The property test's operations on two managers; appends go through Python on one and C++
    on the other, the rest through Python on both (the native path only replaces appends)."""
    bms = [BlockManager(num_blocks, block_size, enable_prefix_caching=prefix) for _ in range(2)]
    lives: list[list[Sequence]] = [[], []]
    can = [lambda bm, s: bm.can_append(s), native.can_append]
    slot = [lambda bm, s: bm.append_slot(s), native.append_slot]
    for op, pick, size in ops:
        results = []
        for k, (bm, live) in enumerate(zip(bms, lives)):
            if op == "alloc":
                s = Sequence([pick % 7] * size, size, StopRule(1000))
                ok = bm.can_allocate(s)
                if ok:
                    bm.allocate(s)
                    s.num_cached_tokens = s.num_tokens
                    bm.commit(s)
                    live.append(s)
                results.append(ok)
            elif live:
                s = live[pick % len(live)]
                if op == "fork":
                    children = [s.fork(i) for i in range(1 + size % 4)]
                    bm.fork(s, children)
                    bm.free(s)
                    live.remove(s)
                    live += children
                elif op == "append":
                    s.append(pick % 5, 0.0)
                    ok = can[k](bm, s)
                    results.append((ok, slot[k](bm, s) if ok else None))
                    if ok:
                        s.num_cached_tokens = s.num_tokens
                        bm.commit(s)
                    else:
                        s.token_ids.pop()
                        s.logprobs.pop()
                else:
                    bm.free(s)
                    live.remove(s)
        assert results[:1] == results[1:]
        assert bm_state(bms[0]) == bm_state(bms[1])
        assert [seq_state(s) for s in lives[0]] == [seq_state(s) for s in lives[1]]


def fake_token(seq: Sequence) -> int:
    return (sum(seq.token_ids) * 31 + seq.num_tokens * 7 + seq.sample_index * 13) % 9 + 1


def make_workload(rng: random.Random, mode: str, prefix: bool) -> Scheduler:
    block_size = rng.choice([1, 2, 4, 16])
    max_len = 48
    cfg = SchedulerConfig(max_num_seqs=rng.randint(1, 10), max_num_batched_tokens=rng.randint(8, 64),
                          max_model_len=max_len, host_path=mode)
    sched = Scheduler(cfg, BlockManager(-(-max_len // block_size) + rng.randint(0, 30), block_size, prefix))
    shared = [rng.randint(1, 9) for _ in range(rng.randint(1, 24))]
    for r in range(rng.randint(1, 5)):
        prompt = shared[:rng.randint(1, len(shared))] if rng.random() < 0.5 else [rng.randint(1, 9)] * rng.randint(1, 20)
        stops = frozenset(rng.sample(range(1, 10), rng.randint(0, 2)))
        sched.add(Sequence(prompt, len(prompt), StopRule(rng.randint(1, 20), stops, max_len),
                           request_index=r, num_samples=rng.randint(1, 4)))
    return sched


@pytest.mark.parametrize("prefix", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_scheduler_random_workloads_native_equals_python_step_by_step(prefix):
    preempted, copies, reasons, hits = 0, 0, set(), 0
    for trial in range(60):
        scheds = [make_workload(random.Random(trial), mode, prefix) for mode in ("python", "native")]
        steps = 0
        while not scheds[0].is_finished():
            seen = []
            for s in scheds:
                batch = s.schedule()
                samples = [[(fake_token(q), -0.25 * q.num_tokens)] * k for q, k in zip(batch.seqs, batch.num_samples)]
                done = s.postprocess(batch, samples)
                seen.append(([seq_state(q)[0] for q in batch.seqs], batch.is_prefill, batch.chunk_lens,
                             batch.num_samples, batch.copies, [seq_state(q) for q in done], sched_state(s)))
            assert seen[0] == seen[1], f"trial {trial}, step {steps}"
            steps += 1
            copies += len(seen[0][4])
            reasons |= {q[-1] for q in seen[0][5]}
        assert scheds[1].is_finished()
        preempted += scheds[0].num_preemptions
        hits += scheds[0].blocks.num_hit_tokens
    # the workloads do exercise preemption (the native path's callback), copy-on-write, both stop
    # rules, and prefix-cache hits when caching is on
    assert preempted > 0 and copies > 0 and reasons == {"stop", "length"} and (hits > 0) == prefix


def test_native_errors_name_the_sequence_and_the_empty_pool():
    bm = BlockManager(1, 4)
    s = Sequence([1, 2, 3, 4], 4, StopRule(8))
    bm.allocate(s)
    s.append(5, 0.0)
    assert native.can_append(bm, s) is False
    with pytest.raises(RuntimeError, match="no free KV-cache block"):
        native.append_slot(bm, s)
    s.token_ids += [6, 7, 8, 9]
    with pytest.raises(RuntimeError, match=f"sequence {s.seq_id}: token 8 is past block table"):
        native.append_slot(bm, s)


def test_host_path_selection_is_validated():
    with pytest.raises(ValueError, match="host path 'fast'"):
        SchedulerConfig(host_path="fast")
    assert host_path.resolve("python") is None and host_path.resolve("native") is native


@pytest.fixture(scope="module")
def tiny(ckpt25):
    from rlpt_fast import load_model

    return load_model(ckpt25, dtype=torch.float32).eval()


@pytest.mark.parametrize("engine_kw", [dict(num_blocks=64, block_size=4),
                                       dict(num_blocks=14, block_size=4, max_num_batched_tokens=16,
                                            enable_prefix_caching=True)], ids=["roomy", "tiny-cache-prefix"])
def test_engine_greedy_outputs_identical_with_python_and_native_paths(tiny, monkeypatch, engine_kw):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=gen) for n in (13, 7, 21)]
    prompts.append(prompts[0].clone())  # a prefix-cache hit when caching is on
    params = [SamplingParams(temperature=0, max_tokens=9), SamplingParams(n=3, max_tokens=7, ignore_eos=True, seed=1),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), SamplingParams(n=2, max_tokens=5, seed=2)]
    outs, stats = {}, {}
    for mode in ("python", "native"):
        monkeypatch.setenv(host_path.ENV, mode)
        engine = Engine(tiny, **engine_kw)
        assert (engine.scheduler._native is None) == (mode == "python")
        got = engine.generate([Request(p) for p in prompts], params)
        outs[mode] = [[(c.token_ids, c.logprobs, c.finish_reason) for c in o] for o in got]
        stats[mode] = {k: v for k, v in engine.stats.items() if not k.endswith("seconds")}
    assert outs["native"] == outs["python"]
    assert stats["native"] == stats["python"]
    if "enable_prefix_caching" in engine_kw:
        assert stats["native"]["preemptions"] > 0
