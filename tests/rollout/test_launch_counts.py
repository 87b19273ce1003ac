"""Kernels per decode step of the engine on its GPU path (Triton kernels, in the interpreter here),
counted by the dispatcher: a decode step at batch 64-128 is launch-bound, so these counts are the
CPU's handle on the GPU's decode time. Per layer: add+RMSNorm twice, the q/k/v GEMM, rotary with
the KV store, the cascade decode's partials (shared prefix and own suffix in one launch) and its
combine, o_proj, the gate/up GEMM, SiLU*up, down_proj. With LoRA on every Linear, one more kernel
for each of the groups q/k/v, o_proj, gate/up, down_proj (their stacked A rides in the group's
GEMM, in rows reserved after its weights; the block-diagonal B is one addmm). Before the fusions
of 2026-11-27 (rotary apart from the store, the cascade's passes apart, each LoRA A a GEMM of its
own): 12 and 20. A change that moves a count should change the figure here and in
benchmarks/README.md."""
import pytest
import torch

from rlpt_fast.launch_count import count_launches
from rlpt_fast.model import load_model
from rlpt_fast.model.lora import LoRAConfig, apply_lora
from rlpt_fast.rollout import Engine, Request, SamplingParams
from rlpt_fast.testing import write_tiny_checkpoint

PER_LAYER = {False: 10, True: 14}  # by LoRA


def _decode_step_launches(tmp_path, layers: int, lora: bool) -> int:
    """Kernels of one more decode step (G = 4 samples of one prompt, sampled at temperature 1)."""
    path = write_tiny_checkpoint(tmp_path / f"l{layers}", "qwen2_5_vl", seed=0, num_hidden_layers=layers)
    model = load_model(path, dtype=torch.float32)
    if lora:
        apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.05))
    engine = Engine(model, num_blocks=64, attention_backend="triton")
    request = [Request(list(range(5, 40)))]

    def run(tokens):
        return engine.generate(request, SamplingParams(n=4, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=1))

    run(3)  # compiled and cached once
    return count_launches(lambda: run(3)) - count_launches(lambda: run(2))


@pytest.mark.parametrize("lora", [False, True])
def test_kernels_per_decoder_layer_in_a_decode_step(tmp_path, monkeypatch, lora):
    monkeypatch.setenv("RLPT_KERNELS_BACKEND", "triton")  # the fused decoder ops, as on a GPU
    one, two = (_decode_step_launches(tmp_path, n, lora) for n in (1, 2))
    assert two - one == PER_LAYER[lora]
    # the step's own (17 on 2026-11-27, 26 before the one-launch sampler): embedding, rotary
    # tables, final norm, lm_head, sampling, the samples packed for the host
    assert one - PER_LAYER[lora] <= 20
