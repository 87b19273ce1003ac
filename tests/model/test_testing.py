"""The tiny-checkpoint fixture opens in transformers offline and holds what it promises."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer

from rlpt_fast.testing import SPECIAL_TOKENS, write_tiny_checkpoint

EXPECTED_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the dog.<|im_end|>\n"
    "<|im_start|>assistant\nA dog.<|im_end|>\n<|im_start|>assistant\n"
)


def test_tokenizer_and_template_open_in_transformers(tiny_ckpt):
    from transformers import AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt, local_files_only=True)
    raw = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    text = "A photo of Anna, 42 dogs!\n<|im_start|>user\n"
    assert tok(text).input_ids == raw.encode(text).ids
    assert tok.decode(tok(text).input_ids) == text
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg["vocab_size"] >= len(tok) >= len(SPECIAL_TOKENS) + 256
    proc = AutoProcessor.from_pretrained(tiny_ckpt, local_files_only=True)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the dog."}]},
        {"role": "assistant", "content": "A dog."},
    ]
    assert proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == EXPECTED_CHAT


def test_model_class_opens_and_runs(tiny_ckpt):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_ckpt, local_files_only=True)
    with safe_open(tiny_ckpt / "model.safetensors", "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    state = model.state_dict()
    assert set(on_disk) == set(state)
    for k, v in on_disk.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    proc = AutoProcessor.from_pretrained(tiny_ckpt, local_files_only=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 112, 3), dtype=np.uint8))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                    add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text], images=[img], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 12
    logits = model(**inputs).logits
    # O(1)-scale weights: logits vary across the vocabulary (not the near-constant 0.02-init ones).
    assert logits.shape[-1] == model.config.text_config.vocab_size and logits.std() > 0.3


def test_layouts_ties_and_shards(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "c", "qwen2_vl", seed=1, key_layout="old",
                                 config_layout="nested", shards=3, tie_word_embeddings=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) == 3 and not (path / "model.safetensors").exists()
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert any(k.startswith("visual.blocks.") for k in keys)
    assert "text_config" in json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="arch"):
        write_tiny_checkpoint(tmp_path / "d", "llama")
