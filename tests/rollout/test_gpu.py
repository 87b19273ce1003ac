"""The GPU path end to end (skipped without CUDA): Triton kernels, cascade decode and CUDA graphs
give the tokens of the torch path; the cache is sized from free memory."""
import pytest
import torch
from rollout_helpers import prompt

from rlpt_fast.rollout import Engine, Request, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model(ckpt25):
    from rlpt_fast import load_model

    return load_model(ckpt25, dtype=torch.float32, device="cuda")


def test_graphs_and_triton_match_torch_path_fp32(gpu_model):
    cfg = gpu_model.config
    reqs = [Request(*prompt(cfg, 1, [13])), Request(*prompt(cfg, 2, [5, 3, 4], [[1, 4, 6], [1, 6, 4]]))]
    params = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(n=8, max_tokens=12, seed=4, ignore_eos=True)]
    kw = dict(num_blocks=256, block_size=16, max_num_seqs=16, max_model_len=256)
    ref = Engine(gpu_model, attention_backend="torch", cuda_graphs=False, **kw).generate(reqs, params)
    fast = Engine(gpu_model, **kw)
    assert fast.runner.graphs is not None and fast.runner.backend.name == "triton"
    got = fast.generate(reqs, params)
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in ref]
    for a, b in zip(got, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-3, rtol=0)


def _tokens_around_an_update(gpu_model, seed: int, weight: torch.Tensor, update) -> tuple[list, list, list]:
    """Greedy tokens (before, after, want): a graphed engine's before and after `update(weight)`
    (in place), and a fresh eager torch-path engine's after it. The weight is put back."""
    req = [Request(*prompt(gpu_model.config, seed, [9]))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = Engine(gpu_model, num_blocks=64, max_num_seqs=8, max_model_len=128)
    before = engine.generate(req, params)[0][0].token_ids
    saved = weight.detach().clone()
    with torch.no_grad():
        update(weight)
    try:
        after = engine.generate(req, params)[0][0].token_ids
        fresh = Engine(gpu_model, attention_backend="torch", cuda_graphs=False, num_blocks=64, max_model_len=128)
        want = fresh.generate(req, params)[0][0].token_ids
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    return before, after, want


def test_in_place_update_seen_by_captured_graphs(gpu_model):
    before, after, want = _tokens_around_an_update(gpu_model, 3, gpu_model.lm_head.weight,
                                                   lambda w: w[7].add_(50 * w[7].sign()))
    assert after == want != before


@pytest.mark.parametrize("leaf", ["self_attn.v_proj", "mlp.up_proj"])
def test_in_place_update_of_a_packed_projection_seen_by_captured_graphs(gpu_model, leaf):
    """The engine packs q/k/v and gate/up (one GEMM each): its graphs read the packed storage,
    which an in-place update of one projection's Parameter writes."""
    from rlpt_fast.model.packed_linear import packed_operands

    layer = gpu_model.model.language_model.layers[0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = layer.get_submodule(leaf).weight
    std = weight.detach().std()
    before, after, want = _tokens_around_an_update(
        gpu_model, 4, weight, lambda w: w.copy_(torch.randn(w.shape, device="cuda", generator=gen) * std * 4))
    attn, mlp = layer.self_attn, layer.mlp  # packed by the engines built above
    assert packed_operands([attn.q_proj, attn.k_proj, attn.v_proj]) is not None
    assert packed_operands([mlp.gate_proj, mlp.up_proj]) is not None
    assert after == want != before


def test_cache_sized_from_free_memory(gpu_model):
    engine = Engine(gpu_model, gpu_memory_utilization=0.5, max_num_seqs=8, max_model_len=256)
    _, total = torch.cuda.mem_get_info()
    assert engine.num_blocks * engine.runner.block_bytes < 0.5 * total
    assert engine.num_blocks >= engine.config.max_blocks_per_seq
