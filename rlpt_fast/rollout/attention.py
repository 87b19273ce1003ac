"""The AttentionFn the engine hands to model.forward_hidden: store new K/V, then attend.

The backend (Triton kernels or their torch references) is chosen once, here, by device: the
attention kernels and the sampler. With the Triton backend the function takes q and k unrotated
from the decoder's fused path (`fuses_rotary`, model/attention.py) and rotates them in the launch
that stores K/V.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpt_fast.model.attention import AttentionFn
from rlpt_fast.rollout import decode_attention as dec
from rlpt_fast.rollout import kv_store
from rlpt_fast.rollout.cascade_attention import CascadeMeta, PrefixGroups, cascade_decode_attention_triton
from rlpt_fast.rollout.cascade_torch import cascade_decode_attention
from rlpt_fast.rollout.prefill_attention import PrefillMeta, prefill_attention
from rlpt_fast.rollout.sampler import sample
from rlpt_fast.rollout.sampler_triton import sample_triton


@dataclass(frozen=True)
class Backend:
    store_kv: object
    rotary_store_kv: object
    decode_attention: object
    sample: object  # sampler.sample's signature
    name: str


def choose_backend(device: torch.device, preference: str = "auto") -> Backend:
    triton = preference == "triton" or (preference == "auto" and device.type == "cuda")
    if triton:
        return Backend(kv_store.store_kv, kv_store.rotary_store_kv, dec.decode_attention, sample_triton, "triton")
    return Backend(kv_store.store_kv_reference, kv_store.rotary_store_kv_reference, dec.decode_attention_reference,
                   sample, "torch")


@dataclass
class DecodeMeta:
    """slot_mapping (B,) int64 (-1: padding row); block_tables (B, W) int32; context_lens (B,)
    int32; num_splits / max_context are host ints fixed per batch shape (CUDA-graph safe);
    cascade / groups: the shared-prefix grouping (torch / Triton backend); padded: whether
    slot_mapping may hold padding rows (the torch backend then checks them at every layer)."""
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    num_splits: int
    max_context: int
    cascade: CascadeMeta | None = None   # torch backend: forked groups read their shared prompt once
    groups: PrefixGroups | None = None   # the same for the Triton backend
    padded: bool = True                  # slot_mapping may hold -1 (False: the runner built every row)


def paged_attention(kv_cache: torch.Tensor, backend: Backend, meta: DecodeMeta | None,
                    prefill: PrefillMeta | None, slot_mapping: torch.Tensor) -> AttentionFn:
    """kv_cache: (2, L, num_blocks, block_size, Hkv, D). Exactly one of meta / prefill is given."""
    scale = kv_cache.shape[-1] ** -0.5
    gathered: dict = {}  # torch backend: context slots computed once per step, shared by all layers

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0, layer_idx], kv_cache[1, layer_idx]
        if rotary is not None:
            q, k = backend.rotary_store_kv(q, k, v, *rotary, k_cache, v_cache, slot_mapping)
        elif backend.name == "torch" and meta is not None and not meta.padded:
            # the runner built every row (no -1 to skip) and the shapes: store without the checks
            rows = gathered.get("rows")
            if rows is None:
                rows = gathered["rows"] = slot_mapping.long()
            k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, rows, k)
            v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, rows, v)
        else:
            backend.store_kv(k, v, k_cache, v_cache, slot_mapping)
        if prefill is not None:
            return prefill_attention(q, k, v, k_cache, v_cache, prefill, scale)
        if backend.name == "triton" and meta.groups is not None:
            return cascade_decode_attention_triton(q.contiguous(), k_cache, v_cache, meta.block_tables,
                                                   meta.context_lens, meta.groups, scale, meta.num_splits,
                                                   meta.max_context)
        if backend.name == "triton":
            return backend.decode_attention(q.contiguous(), k_cache, v_cache, meta.block_tables, meta.context_lens,
                                            scale, meta.num_splits, meta.max_context)
        if meta.cascade is not None:
            return cascade_decode_attention(q, k_cache, v_cache, meta.cascade, scale, gathered, layer_idx, (k, v))
        if "all" not in gathered:
            gathered["all"] = dec.context_slots(meta.block_tables, meta.context_lens, k_cache.shape[1])
        return dec.attend_slots(q, k_cache, v_cache, *gathered["all"], scale)

    attn.fuses_rotary = backend.name == "triton"  # one launch fewer per layer where launches count
    return attn
