"""The engine on a LoRA-wrapped model: the cached inference path gives the tokens and log-probs of
the per-call-cast path, and after an AdamW step on the adapters the next generate uses the new
weights, with every cache refreshed in place (what the GPU's CUDA graphs rely on)."""
import pytest
import torch
from rollout_helpers import load_ours, naive_greedy, prompt

from rlpt_fast.model import lora_inference
from rlpt_fast.model.lora import LoRAConfig, apply_lora, lora_layers
from rlpt_fast.rollout import Engine, Request, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def adapted(ckpt25):
    model = load_ours(ckpt25)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1))  # every decoder Linear and lm_head
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
    return model.train()  # as the trainer hands it over: dropout must not reach the rollout


def _old_path(monkeypatch, fn):
    """fn() with the inference cache switched off (the per-call-cast path)."""
    with monkeypatch.context() as m:
        m.setattr(lora_inference, "ENABLED", False)
        return fn()


def _pointers(model):
    """Every cache's storage: the adapters' own and the packed groups' (q/k/v, o, gate/up, down;
    the groups' A inside the rows reserved after their packed weights)."""
    caches = [m.inference_cache for _, m in lora_layers(model)]
    groups = [c.group for c in caches if c.group is not None]
    assert len(groups) == 4 * model.config.num_hidden_layers  # every decoder Linear is adapted
    assert all(g.fused is not None for g in groups)
    return [(c.a.data_ptr(), c.b.data_ptr()) for c in caches + groups]


def test_cached_path_generates_what_the_per_call_cast_path_does(adapted, monkeypatch):
    mm = prompt(adapted.config, 11, [6, 5, 3], [[1, 4, 6], [1, 4, 4]])
    sampled = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True)
    old = _old_path(monkeypatch, lambda: Engine(adapted, num_blocks=64).generate([Request(*mm)] * 2, [GREEDY, sampled]))
    assert all(m.inference_cache.a is None for _, m in lora_layers(adapted))
    new = Engine(adapted, num_blocks=64).generate([Request(*mm)] * 2, [GREEDY, sampled])
    assert all(m.inference_cache.a is not None for _, m in lora_layers(adapted))
    assert adapted.training
    for a, b in zip(sum(old, []), sum(new, [])):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    adapted.eval()
    assert old[0][0].token_ids == _old_path(monkeypatch, lambda: naive_greedy(adapted, *mm, 6))


def _push_away(model, mm, completion, fused: bool) -> None:
    """Three AdamW steps on the adapters that lower the log-prob of `completion` after prompt mm."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=fused,
                            foreach=not fused)
    ids = torch.cat([mm[0], torch.tensor(completion)])
    target = torch.tensor(completion, device=model.device)[:, None]
    for _ in range(3):
        logits = model.logits(ids)[mm[0].numel() - 1:-1]
        torch.log_softmax(logits.float(), -1).gather(1, target).sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fused", [True, False])  # fused (the trainer's default) leaves _version alone
def test_next_generate_after_an_adamw_step_uses_the_new_adapters(adapted, monkeypatch, fused):
    mm = prompt(adapted.config, 5, [9])
    engine = Engine(adapted, num_blocks=64)
    before = engine.generate([Request(*mm)], GREEDY)[0][0].token_ids
    ptrs = _pointers(adapted)
    _push_away(adapted, mm, before, fused)
    got = engine.generate([Request(*mm)], GREEDY)[0][0].token_ids
    adapted.eval()
    want = _old_path(monkeypatch, lambda: naive_greedy(adapted, *mm, 6))
    assert got == want != before
    assert _pointers(adapted) == ptrs  # refreshed in place: a captured graph reads the new values


@pytest.mark.gpu
def test_captured_graphs_read_the_adapters_of_the_last_optimizer_step(ckpt25, monkeypatch):
    """CUDA graphs captured over the caches (on a model in train mode, dropout 0.5: not recorded)
    replay the new adapters after a fused AdamW step: the refresh at generate start, in place."""
    from rlpt_fast import load_model

    model = load_model(ckpt25, dtype=torch.float32, device="cuda")
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.5))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0.0, 0.05)
    model.train()
    mm = prompt(model.config, 5, [9])
    kw = dict(num_blocks=64, max_num_seqs=8, max_model_len=128)
    engine = Engine(model, **kw)
    assert engine.runner.graphs is not None
    eager = lambda: Engine(model, attention_backend="torch", cuda_graphs=False, **kw).generate([Request(*mm)], GREEDY)
    before = engine.generate([Request(*mm)], GREEDY)[0][0].token_ids
    assert before == _old_path(monkeypatch, eager)[0][0].token_ids
    _push_away(model, mm, before, fused=True)
    got = engine.generate([Request(*mm)], GREEDY)[0][0].token_ids
    assert got == _old_path(monkeypatch, eager)[0][0].token_ids != before
