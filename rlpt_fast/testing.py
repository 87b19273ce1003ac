"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoint directories for tests, built offline.

`write_tiny_checkpoint(path)` writes everything a Hugging Face checkpoint directory holds:
config.json (in the flat layout of the released Qwen checkpoints, or the nested transformers-5
layout), model.safetensors (random weights, transformers' own key names, optionally sharded),
tokenizer.json + tokenizer_config.json (a small byte-level BPE trained here on a built-in English
corpus, Qwen's special tokens, the Qwen2-VL chat template), chat_template.jinja and
preprocessor_config.json (Qwen2VLImageProcessor: patch 14, merge 2, temporal patch 2, small
max_pixels). transformers' AutoTokenizer / AutoProcessor / model class and our `load_model` all
open it without any download.

Weights are drawn from a seeded generator at a scale where activations are O(1) (std 1/sqrt(fan_in),
norm weights near 1, non-zero biases), so parity tests are sensitive to real mistakes; the default
transformers init (std 0.02) would make almost every function of the input look alike.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# Qwen's special tokens, in the order of the released vocabularies (ids follow the BPE vocab here).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The pre-tokenizer regex of Qwen2's tokenizer (transformers rebuilds this pipeline on load, so
# ours must be the same for AutoTokenizer and the raw tokenizer.json to agree).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2-VL chat template, rendering the same text as the released one: a default system turn,
# images as <|vision_start|><|image_pad|><|vision_end|>, an optional generation prompt.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

CORPUS = [
    "You are a helpful assistant. Describe the image in one sentence.",
    "A photo of a dog sitting on the grass next to a red ball in the park.",
    "The cat is sleeping on a blue sofa while the sun shines through the window.",
    "Two people are walking along the beach at sunset, holding hands.",
    "This is my friend Anna. She is wearing a green jacket and smiling at the camera.",
    "A small boat floats on a calm lake surrounded by tall mountains and pine trees.",
    "The kitchen table holds a bowl of fruit: apples, bananas, oranges and grapes.",
    "A man in a black hat rides a bicycle down a busy city street.",
    "Write a short caption for the picture. Mention the person by name if you know them.",
    "The children are playing football in the school yard after the rain.",
    "An old car parked in front of a white house with a wooden door.",
    "In the first image, the dog runs; in the second image, it sleeps; in the third, it eats.",
    "What is shown in this picture? Please answer briefly and accurately.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
]

TEXT_DEFAULTS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
    hidden_act="silu", tie_word_embeddings=False,
)

VISION_DEFAULTS = {
    "qwen2_vl": dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_act="quick_gelu",
                     in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, hidden_act="silu",
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
}

ARCH_CLASS = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
              "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 48  # at most 48 merged image tokens per image: tiny, still several windows


def build_tokenizer(corpus: list[str] | None = None, bpe_vocab_size: int = 400):
    """A byte-level BPE in Qwen2's pipeline (NFC, Qwen regex, byte level), plus Qwen's specials.

    Returns a `tokenizers.Tokenizer`; special-token ids follow the BPE vocabulary in SPECIAL_TOKENS
    order.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + list(corpus or []), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(tok) -> dict:
    decoder = {}
    for t in SPECIAL_TOKENS:
        decoder[str(tok.token_to_id(t))] = dict(content=t, lstrip=False, normalized=False,
                                                 rstrip=False, single_word=False, special=True)
    return dict(
        tokenizer_class="Qwen2Tokenizer", added_tokens_decoder=decoder, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        model_max_length=32768, clean_up_tokenization_spaces=False, errors="replace",
        split_special_tokens=False, add_prefix_space=False, chat_template=CHAT_TEMPLATE,
    )


def _preprocessor_config(arch: str) -> dict:
    return dict(
        image_processor_type="Qwen2VLImageProcessor", processor_class=PROCESSOR_CLASS[arch],
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        do_convert_rgb=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2,
    )


def _flat_config(arch: str, tok, overrides: dict) -> dict:
    """config.json in the flat layout of the released checkpoints (text fields at the top)."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    text = dict(TEXT_DEFAULTS)
    vision = dict(VISION_DEFAULTS[arch])
    vision.update(overrides.pop("vision_config", {}))
    text.update(overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault("mrope_section", _default_mrope_section(head_dim))
    text.setdefault("vocab_size", 64 * math.ceil(tok.get_vocab_size() / 64))
    if arch == "qwen2_vl":
        vision.setdefault("hidden_size", text["hidden_size"])
    else:
        vision.setdefault("out_hidden_size", text["hidden_size"])
    mrope_section = text.pop("mrope_section")
    return dict(
        architectures=[ARCH_CLASS[arch]], model_type=arch, **text,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_config=vision, torch_dtype="float32",
        use_sliding_window=False, attention_dropout=0.0,
    )


def _default_mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) like Qwen's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _nested_config(flat: dict) -> dict:
    """The same config in transformers 5's nested layout (text_config / vision_config)."""
    from transformers import AutoConfig

    return json.loads(AutoConfig.for_model(**flat).to_json_string())


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1)-scale random weights: std 1/sqrt(fan_in), norms near 1, biases non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def _to_old_layout(key: str) -> str:
    """transformers-5 key -> key of the released checkpoints (model.layers.*, visual.*)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def _write_weights(path: Path, model: torch.nn.Module, key_layout: str, shards: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if key_layout == "old":
        state = {_to_old_layout(k): v for k, v in state.items()}
    elif key_layout != "new":
        raise ValueError(f"key_layout must be 'old' or 'new', got {key_layout!r}")
    meta = {"format": "pt"}
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata=meta)
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata=meta)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(path: str | Path, arch: str = "qwen2_5_vl", seed: int = 0, *,
                          corpus: list[str] | None = None, key_layout: str = "new",
                          config_layout: str = "flat", shards: int = 1, **overrides) -> Path:
    """Write a complete tiny random checkpoint directory for `arch` and return its path.

    arch: "qwen2_vl" or "qwen2_5_vl". overrides: text-config fields (hidden_size, num_hidden_layers,
    tie_word_embeddings, mrope_section, vocab_size, ...) and `vision_config={...}` merged into the
    vision defaults. corpus: extra sentences for the BPE trainer (so a caller's words tokenize
    into few tokens). key_layout: "new" (model.language_model.*, model.visual.*) or "old"
    (model.layers.*, visual.*). config_layout: "flat" (released checkpoints) or "nested".
    shards > 1 writes model-0000k-of-0000n.safetensors plus model.safetensors.index.json.
    """
    from transformers import AutoConfig
    import transformers

    if arch not in ARCH_CLASS:
        raise ValueError(f"arch must be one of {sorted(ARCH_CLASS)}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus)
    flat = _flat_config(arch, tok, dict(overrides))
    config = AutoConfig.for_model(**flat)
    model = getattr(transformers, ARCH_CLASS[arch])(config).eval()
    _randomize(model, seed)
    _write_weights(path, model, key_layout, shards)
    cfg = flat if config_layout == "flat" else _nested_config(flat)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(arch), indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": flat["bos_token_id"], "eos_token_id": [flat["eos_token_id"], flat["pad_token_id"]],
         "pad_token_id": flat["pad_token_id"], "do_sample": False}, indent=2))
    return path
