"""Cost accounting owned by the model, for MFU / bandwidth figures in benchmarks.

FLOPs count multiply-adds of the matmuls as 2 FLOPs (norms, rotary, activations, softmax and bias
adds are left out, as is customary). Per token of the decoder:
    linear = 2 * (sum over layers of q,k,v,o,gate,up,down weight elements + lm_head elements)
    attn   = 4 * num_layers * num_heads * head_dim * context     (QK^T and PV over `context` keys)
Training is forward + backward = 3x forward (backward computes both input and weight gradients;
with frozen base weights and LoRA the true cost is closer to 2x: we report the full-training
convention so MFU figures are comparable with the literature).
"""
from __future__ import annotations

from torch import nn


class ModelCosts:
    """Mixin for QwenVLModel (expects self.config, self.model, self.lm_head)."""

    def _decoder_matmul_params(self) -> int:
        cfg = self.config
        h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        attn = h * hq * d * 2 + h * hkv * d * 2  # q, o and k, v
        mlp = 3 * h * cfg.intermediate_size
        return cfg.num_hidden_layers * (attn + mlp) + h * cfg.vocab_size

    def flops_per_token(self, context: int, training: bool) -> float:
        """FLOPs for one token attending to `context` keys (itself included); see module doc."""
        cfg = self.config
        fwd = 2 * self._decoder_matmul_params() + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * context
        return float(3 * fwd if training else fwd)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cached per token over all layers, at the model's dtype."""
        cfg = self.config
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * self.dtype.itemsize

    def weight_bytes(self) -> int:
        """Bytes of decoder + head weights (a tied head counted once); the vision tower apart."""
        return _bytes(self.model.language_model, self.lm_head)

    def vision_weight_bytes(self) -> int:
        return _bytes(self.model.visual)


def _bytes(*modules: nn.Module) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total
