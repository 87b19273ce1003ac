"""Prompts in both layouts, rendered with the checkpoint's own chat template, against
transformers' Qwen2-VL processor on the same messages and images."""
import collections
import random

import pytest
import torch

from rlpt_fast import testing
from rlpt_fast.data import Row, load_database, open_image
from rlpt_fast.image_processing import VisionConfig, num_image_tokens, repic_resize
from rlpt_fast.prompts import (
    NAME_SUFFIXES,
    SUFFIX_IOU,
    SUFFIX_YES_NO,
    SYSTEM_PROMPT,
    PromptBuilder,
    inference_messages,
    question_for,
    row_rng,
    task_suffix,
    training_messages,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "qwen2vl", arch="qwen2_vl")


@pytest.fixture(scope="module")
def processor(ckpt):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(str(ckpt))


def _pad_runs(ids, pad):
    runs, n = [], 0
    for t in ids.tolist() + [-1]:
        if t == pad:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_inference_prompt_on_real_images_equals_transformers(repic, ckpt, processor):
    db = load_database(repic / "databases/database_4_concepts/database_mod.json")
    concepts = db.select(["<ironman>", "<thor>", "<hulk>", "<black widow>"])
    query = repic / "query-images-4-concepts/group photo_avengers.jpg"
    b = PromptBuilder(ckpt, vision=VisionConfig.from_pretrained(ckpt, backend="torch"))
    p = b.inference_prompt(concepts, query, question_for(4, multi_concept=True))
    # layout: system prompt, "i. Name: <shown name>, Info: ..." after each reference image
    assert p.text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>")
    assert "<|image_pad|><|vision_end|>2. Name: <Iron Man>, Info: A billionaire" in p.text
    assert p.text.endswith("<|vision_end|>This is the query image. Give a personal caption of "
                           "the image.<|im_end|>\n<|im_start|>assistant\n")
    # token counts per image: what smart_resize implies, and what transformers produces
    images = [open_image(c.image) for c in concepts] + [open_image(query)]
    want = [num_image_tokens(*im.size, b.vision) for im in images]
    assert _pad_runs(p.input_ids, b.image_pad_id) == want
    text = processor.apply_chat_template(inference_messages(concepts, question_for(4, True)),
                                         tokenize=False, add_generation_prompt=True)
    ref = processor(text=[text], images=images, return_tensors="pt")
    assert torch.equal(ref["input_ids"][0], p.input_ids)
    assert torch.equal(ref["image_grid_thw"], p.image_grid_thw)
    assert torch.equal(ref["pixel_values"], p.pixel_values)
    assert p.scales[0] == (p.image_grid_thw[0, 2].item() * 14 / images[0].width,
                           p.image_grid_thw[0, 1].item() * 14 / images[0].height)


def test_training_prompt_applies_repic_resize_and_matches_transformers(repic, ckpt, processor):
    paths = (repic / "databases/database_2_concepts/Anya.jpg",
             repic / "query-images-4-concepts/group photo_movie.jpg")  # 1200x654 -> 939x512
    row = Row(paths, "Is <Anya> in the last image?", "yes", "yes_no", "t:1", single_image=False)
    b = PromptBuilder(ckpt, vision=VisionConfig.from_pretrained(ckpt, backend="torch"))
    p = b.training_prompt(row, random.Random(0))
    assert p.text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>"
                      "user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * 2
                      + "Is <Anya> in the last image?" + SUFFIX_YES_NO
                      + "<|im_end|>\n<|im_start|>assistant\n")
    originals = [open_image(q) for q in paths]
    resized = [repic_resize(im, multi_image=True) for im in originals]
    assert any(r.size != o.size for r, o in zip(resized, originals))  # the 512 rule applied
    ref = processor(text=[processor.apply_chat_template(
        training_messages(2, row.problem + SUFFIX_YES_NO), tokenize=False,
        add_generation_prompt=True)], images=resized, return_tensors="pt")
    assert torch.equal(ref["input_ids"][0], p.input_ids)
    assert torch.equal(ref["pixel_values"], p.pixel_values)
    # scales refer to the original image (boxes in the data are original pixels)
    w_in = p.image_grid_thw[1, 2].item() * 14
    assert resized[1].size == (939, 512) and p.scales[1][0] == w_in / originals[1].width


def test_single_image_box_row_uses_1024_rule_and_scale_feeds_the_reward(repic, ckpt):
    from rlpt_fast.rewards import score
    q = repic / "query-images-4-concepts/group photo_avengers.jpg"  # 2880x1800
    row = Row((q,), "Where is <Thor>?", [100, 200, 900, 1500], "iou", "t:2", single_image=True)
    b = PromptBuilder(ckpt, vision=VisionConfig(max_pixels=1024 * 28 * 28))
    p = b.training_prompt(row, random.Random(0))
    assert p.text.endswith("Where is <Thor>?" + SUFFIX_IOU + "<|im_end|>\n<|im_start|>assistant\n")
    h, w = (p.image_grid_thw[0, 1:] * 14).tolist()
    assert num_image_tokens(1638, 1024, b.vision) == p.image_grid_thw[0].prod().item() // 4
    sx, sy = p.scales[0]
    assert (sx, sy) == (w / 2880, h / 1800)
    # the model answers in its input frame; the strict reward maps it back to original pixels
    box = [round(100 * sx), round(200 * sy), round(900 * sx), round(1500 * sy)]
    answer = '[{"bbox_2d": %s, "label": "Thor"}]' % box
    assert score("iou", answer, row.solution, scale=p.scales[0]) == 1.0
    assert score("iou", answer, row.solution, compat="repic") == 0.0


def test_task_suffix_fractions_and_determinism():
    assert task_suffix("yes_no", random.Random(0)) == SUFFIX_YES_NO
    assert task_suffix("iou", random.Random(0)) == SUFFIX_IOU
    draws = [task_suffix("yes_no_name", row_rng(0, 0, i)) for i in range(20000)]
    assert draws == [task_suffix("yes_no_name", row_rng(0, 0, i)) for i in range(20000)]
    c = collections.Counter(draws)
    assert set(c) == {NAME_SUFFIXES[0], NAME_SUFFIXES[1], ""}
    for s, frac in ((NAME_SUFFIXES[0], 0.2), (NAME_SUFFIXES[1], 0.2), ("", 0.6)):
        assert abs(c[s] / 20000 - frac) < 0.015  # > 4 sigma at n = 20000
    assert draws != [task_suffix("yes_no_name", row_rng(1, 0, i)) for i in range(20000)]
    # RePIC's own draw is random.randint(0, 4): the same mapping on the same generator
    rng_a, rng_b = random.Random(3), random.Random(3)
    for _ in range(50):
        roll = rng_b.randint(0, 4)
        assert task_suffix("yes_no_name_multi", rng_a) == (NAME_SUFFIXES[roll] if roll < 2 else "")


def test_questions_cycle():
    assert question_for(4, False) == "Give a personalized caption of this image."
    assert question_for(2, False) == "Can you provide a personalized caption of this photo?"
    assert question_for(2, True) == "Provide a personalized caption of the given image."
    assert question_for(3, True) == question_for(0, True)


def test_image_cache_is_keyed_by_content(tmp_path):
    from PIL import Image

    from rlpt_fast.prompts import process_image
    Image.new("RGB", (60, 40), "red").save(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    cfg = VisionConfig()
    first = process_image(tmp_path / "a.png", cfg)
    assert process_image(tmp_path / "copy.png", cfg) is first
    assert process_image(tmp_path / "a.png", cfg, "multi") is not first   # other rule, other key
    Image.new("RGB", (60, 40), "blue").save(tmp_path / "a.png")
    changed = process_image(tmp_path / "a.png", cfg)
    assert changed is not first and not torch.equal(changed.pixel_values, first.pixel_values)
    with pytest.raises(ValueError, match="rule must be one of"):
        process_image(tmp_path / "a.png", cfg, "512")
