"""Single-process pieces: prompt sharding keeps groups whole; metric rules; the memory plan."""
import math
import statistics

import pytest
import torch

from rlpt_fast.distributed import (
    group_members,
    init_distributed,
    plan_memory,
    reduce_metrics,
    shard_indices,
    shard_prompts,
)
from rlpt_fast.distributed.reduce import _decode, _encode, rule_for


@pytest.mark.parametrize("world,micro", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)])
def test_prompt_sharding_keeps_groups_whole_and_covers_the_batch(world, micro):
    n, g = 24, 4
    taken = [shard_indices(n, world, r, micro) for r in range(world)]
    assert sorted(i for t in taken for i in t) == list(range(n))  # every prompt exactly once
    per_mb = n // micro
    for r, t in enumerate(taken):  # rank r's micro-batch i lies inside the global micro-batch i
        k = len(t) // micro
        for i in range(micro):
            assert all(i * per_mb <= p < (i + 1) * per_mb for p in t[i * k:(i + 1) * k])
    owner = {}
    for r, t in enumerate(taken):
        for c in group_members(t, g):
            owner.setdefault(c // g, set()).add(r)
    assert all(len(ranks) == 1 for ranks in owner.values()) and len(owner) == n  # whole groups


def test_shard_prompts_two_ranks_two_micro_batches():
    items = list("abcdefgh")
    assert shard_prompts(items, 2, 0, 2) == list("abef")
    assert shard_prompts(items, 2, 1, 2) == list("cdgh")


def test_uneven_batch_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="10 prompts per step do not split into 2 micro-batches on 4 ranks"):
        shard_indices(10, 4, 0, 2)


def test_single_process_fallback(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == (0, 1, True, False, None)
    assert reduce_metrics(ctx, {"loss": 1.5}) == {"loss": 1.5}


def test_missing_torchrun_env_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed("cpu")


def _reduce_offline(per_rank: list[dict], counts: list[dict]) -> dict:
    """reduce_metrics' arithmetic without a process group: encode per rank, sum/max, decode."""
    keys = sorted(set().union(*per_rank))
    out = {}
    for key in keys:
        rule = rule_for(key)
        parts = [_encode(key, rule, m, c) for m, c in zip(per_rank, counts)]
        s = [sum(x) for x in zip(*(p[0] for p in parts))]
        mx = [max(x) for x in zip(*(p[1] for p in parts))]
        out[key] = _decode(rule, s, mx)
    return out


def test_metric_rules_equal_statistics_over_the_union():
    a, b = [1.0, 0.0, 0.5, 0.25, 1.0, 0.0], [0.75, 0.75, 0.0, 1.0]
    ta, tb = [2.0, 4.0], [3.0]  # a task only rank 0 saw
    rank = [{"reward_mean": statistics.fmean(x), "reward_std": statistics.stdev(x), "peak_memory_mb": p,
             "time_rollout": t, "preemptions": q, "completion_length_min": lo, "step": 3}
            for x, p, t, q, lo in ((a, 10.0, 2.0, 1, 5), (b, 30.0, 1.0, 2, 3))]
    rank[0].update({"reward/x/mean": statistics.fmean(ta), "reward/x/std": statistics.stdev(ta), "reward/x/count": 2})
    rank[1].update({"reward/x/mean": tb[0], "reward/x/std": 0.0, "reward/x/count": 1})
    rank[0].update({"reward/only0/mean": 0.5, "reward/only0/std": 0.0, "reward/only0/count": 1})
    got = _reduce_offline(rank, [{"completions": len(a)}, {"completions": len(b)}])
    assert got["reward_mean"] == pytest.approx(statistics.fmean(a + b))
    assert got["reward_std"] == pytest.approx(statistics.stdev(a + b))
    assert got["reward/x/mean"] == pytest.approx(statistics.fmean(ta + tb))
    assert got["reward/x/std"] == pytest.approx(statistics.stdev(ta + tb))
    assert got["reward/x/count"] == 3 and got["reward/only0/mean"] == 0.5
    assert (got["peak_memory_mb"], got["time_rollout"], got["preemptions"]) == (30.0, 2.0, 3)
    assert got["completion_length_min"] == 3 and got["step"] == 3


def test_memory_plan_from_cost_accounting(dist_ckpt):
    from rlpt_fast.model import load_model

    model = load_model(dist_ckpt)
    w, v = model.weight_bytes(), model.vision_weight_bytes()
    kv = 100 * model.kv_bytes_per_token()
    fsdp = plan_memory(model, world_size=4, sharded=True, kv_cache_bytes=kv)
    assert fsdp.weights == math.ceil(w / 4) + v and fsdp.gathered == w - math.ceil(w / 4)
    assert fsdp.gradients == math.ceil(w / 4) and fsdp.optimizer == 2 * math.ceil(w / 4)  # all text trainable
    assert fsdp.generation == fsdp.weights + fsdp.gathered + fsdp.optimizer + kv
    assert "memory plan per rank (fsdp, 4 rank(s))" in fsdp.table()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    rep = plan_memory(model, world_size=4, sharded=False)
    head = model.lm_head.weight.numel() * 4
    assert (rep.strategy, rep.weights, rep.gradients, rep.optimizer) == ("replicate", w + v, head, 2 * head)
    assert torch.is_tensor(model.lm_head.weight)


def test_fork_rng_gives_each_rank_its_own_dropout_stream_and_keeps_rank_0s():
    """Every rank builds the model from one seed; after that, ranks > 0 leave the shared stream so
    LoRA dropout draws different masks per rank, while rank 0 continues the one-process stream."""
    from rlpt_fast.distributed.context import DistContext
    from rlpt_fast.distributed.data_parallel import DataParallel

    draws = []
    for rank in range(3):
        dp = DataParallel("cpu")
        dp.ctx = DistContext(rank=rank, world_size=3, backend="gloo")  # no process group needed here
        torch.manual_seed(7)
        torch.rand(5)  # the model's initial weights: the same on every rank
        dp.fork_rng(7)
        draws.append(torch.rand(1000) < 0.5)  # a dropout mask
    torch.manual_seed(7)
    torch.rand(5)
    assert torch.equal(draws[0], torch.rand(1000) < 0.5)  # rank 0 = one process
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
