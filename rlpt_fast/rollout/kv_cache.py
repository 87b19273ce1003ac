"""How many KV-cache blocks the engine gets.

Given: EngineConfig.num_blocks. On CUDA: measured, as nano-vllm does: run the largest prefill the
scheduler may issue and a full sampling step once, then give the cache gpu_memory_utilization of
the card minus what is in use and the activations' peak. In the trainer's process the optimizer
and training activations are not running at that moment: lower gpu_memory_utilization (or pass
num_blocks) to leave them room. On the CPU: kv_cache_bytes (default 256 MiB) worth, capped at what
max_num_seqs sequences of max_model_len could ever use.
"""
from __future__ import annotations

import gc

import torch

from rlpt_fast.rollout.config import EngineConfig
from rlpt_fast.rollout.sampler import SamplingTensors, sample

CPU_KV_CACHE_BYTES = 256 << 20


def count_blocks(model: torch.nn.Module, config: EngineConfig, block_bytes: int, device: torch.device) -> int:
    if config.num_blocks is not None:
        return config.num_blocks
    if device.type == "cuda" and config.kv_cache_bytes is None:
        return blocks_from_free_memory(model, config, block_bytes, device)
    useful = config.max_num_seqs * config.max_blocks_per_seq + 1
    return max(1, min(useful, (config.kv_cache_bytes or CPU_KV_CACHE_BYTES) // block_bytes))


@torch.no_grad()
def blocks_from_free_memory(model: torch.nn.Module, config: EngineConfig, block_bytes: int,
                            dev: torch.device) -> int:
    """Run the largest prefill and sampling once, then give the cache what is left."""
    from rlpt_fast.model.attention import causal_attention

    gc.collect()  # an engine dropped in a reference cycle would still hold its cache
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    n = min(config.max_num_batched_tokens, config.max_model_len)
    ids = torch.zeros(n, dtype=torch.long, device=dev)
    hidden = model.forward_hidden(model.embed(ids), torch.arange(n, device=dev).expand(3, n),
                                  causal_attention(torch.tensor([0, n])))
    rows = min(config.max_num_seqs, n)
    logits = model.compute_logits(hidden[-rows:])
    sample(logits, SamplingTensors.from_rows([(1.0, 5, 0.9, 0, 0, 0)] * rows, dev))
    del hidden, logits
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    peak_extra = torch.cuda.max_memory_allocated(dev) - torch.cuda.memory_allocated(dev)
    budget = total * config.gpu_memory_utilization - (total - free) - peak_extra
    blocks = int(budget) // block_bytes
    if blocks < config.max_blocks_per_seq:
        raise RuntimeError(f"only {blocks} KV-cache blocks fit in GPU memory; one sequence of max_model_len="
                           f"{config.max_model_len} needs {config.max_blocks_per_seq}: lower max_model_len or "
                           f"max_num_batched_tokens, or raise gpu_memory_utilization")
    return blocks
