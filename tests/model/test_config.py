"""config.json of the released checkpoints parses, and the built model has their parameter count."""
import pytest
import torch

from rlpt_fast.model import QwenVLModel
from rlpt_fast.model.config import parse_config

TOKENS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
              vision_end_token_id=151653, image_token_id=151655, video_token_id=151656)

# Decoder and vision fields as in the released config.json files (flat layout).
QWEN2_5_VL_3B = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_act="silu",
    hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_hidden_layers=36,
    num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
    use_sliding_window=False, tie_word_embeddings=True, vocab_size=151936,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                       in_chans=3, out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
                       spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                       tokens_per_second=2, temporal_patch_size=2), **TOKENS)
QWEN2_5_VL_7B = dict(QWEN2_5_VL_3B, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_hidden_layers=28, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064,
                     vision_config=dict(QWEN2_5_VL_3B["vision_config"], out_hidden_size=3584))
QWEN2_VL_2B = dict(
    architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl", hidden_act="silu",
    hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_hidden_layers=28,
    num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    vocab_size=151936, use_sliding_window=False, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=1536,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **TOKENS)


@pytest.mark.parametrize("raw, billions", [(QWEN2_5_VL_3B, 3.75), (QWEN2_5_VL_7B, 8.29), (QWEN2_VL_2B, 2.21)])
def test_released_configs_build_models_of_the_published_size(raw, billions):
    cfg = parse_config(raw)
    assert cfg.head_dim == 128 and cfg.mrope_section == [16, 24, 24] and cfg.eos_token_id == 151645
    with torch.device("meta"):
        model = QwenVLModel(cfg)
    params = sum(p.numel() for p in model.parameters())  # a tied head counted once
    assert abs(params / 1e9 - billions) < 0.01
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert cfg.vision.intermediate_size == (5120 if cfg.architecture == "qwen2_vl" else 3420)


def test_generation_config_eos_ids_are_merged():
    cfg = parse_config(QWEN2_VL_2B, extra_eos=[151645, 151643])
    assert cfg.eos_token_ids == [151645, 151643]


def test_vision_window_must_tile_merged_patches():
    raw = dict(QWEN2_5_VL_3B, vision_config=dict(QWEN2_5_VL_3B["vision_config"], window_size=100))
    with pytest.raises(ValueError, match="window_size 100"):
        parse_config(raw)
