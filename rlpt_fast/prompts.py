"""RePIC's two prompt layouts, rendered into model inputs with the checkpoint's own chat template.

Training (RePIC's LazySupervisedDataset): one user turn, all images first, then one text block,
``problem`` + a task suffix: yes/no and box tasks get a fixed suffix; the name tasks get, drawn
with a seeded generator, "including its name" (1/5), "without duplicating" (1/5) or nothing (3/5).
Images pass through `repic_resize` first (512 rule for list rows, 1024 rule for a lone image).
One difference, on purpose: RePIC gives a multi-image `iou` row a single image slot (a fallback
in their code); here every image of a row gets its slot.

Inference (their caption_eval_*.py, skip-retrieval): system prompt, then per reference image the
image and "i. Name: <shown name>, Info: ...", then the query image and "This is the query image.
<question>", questions cycling through a fixed list; RePIC ran it with max_pixels = 1024*28*28.
The trainer can render training rows in this layout too (data.prompt_layout = "inference"): the
concepts are parsed from the row itself in rlpt_fast/prompt_layout.py.

Rendering: tokenizer.apply_chat_template (the checkpoint's template) -> text with one
<|image_pad|> per image -> token ids, each pad expanded to the image's merged-patch count, exactly
as transformers' Qwen2-VL processor does (tests/recipe/test_prompts.py compares the two).
"""
from __future__ import annotations

import hashlib
import io
import random
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from rlpt_fast.data import Concept, Row, open_image
from rlpt_fast.image_processing import ProcessedImage, VisionConfig, preprocess, repic_resize

SYSTEM_PROMPT = ("You are a captioning assistant. Your task is to generate an accurate caption "
                 "for the query image.\n"
                 "Below is additional information about the reference images.")
SINGLE_QUESTIONS = (
    "Give a personalized caption of this image.",
    "Give a caption of the image.",
    "Can you provide a personalized caption of this photo?",
    "Provide a caption of the given image.",
)
MULTI_QUESTIONS = (
    "Give a personalized caption of this image.",
    "Give a personal caption of the image.",
    "Provide a personalized caption of the given image.",
)
ZERO_SHOT_SUFFIX = " Output the final answer including its name."  # their zero-shot baseline
SUFFIX_YES_NO = " The final answer must be either 'yes' or 'no' with no additional output."
SUFFIX_IOU = " For bounding box coordinates, return the final answer in JSON format."
NAME_SUFFIXES = (" Output the final answer including its name.",
                 " Output the final answer without duplicating the given information.")
INFERENCE_MAX_PIXELS = 1024 * 28 * 28
IMAGE_PAD = "<|image_pad|>"


def row_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for one row's suffix draw: the same for the same (seed, epoch, row)."""
    return random.Random(f"rlpt-suffix:{seed}:{epoch}:{index}")


def task_suffix(method: str, rng: random.Random) -> str:
    if method == "yes_no":
        return SUFFIX_YES_NO
    if method == "iou":
        return SUFFIX_IOU
    roll = rng.randint(0, 4)  # RePIC: 0 -> name, 1 -> no duplication, 2..4 -> nothing
    return NAME_SUFFIXES[roll] if roll < 2 else ""


def training_messages(n_images: int, text: str) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def reference_line(i: int, concept: Concept) -> str:
    """RePIC's retriever line for the i-th (1-based) reference, '<image>\\n' removed."""
    return f"{i}. Name: <{concept.name}>, Info: {concept.info}"


def question_for(index: int, multi_concept: bool) -> str:
    """The index-th question of RePIC's cycling list (single- or multi-concept set)."""
    qs = MULTI_QUESTIONS if multi_concept else SINGLE_QUESTIONS
    return qs[index % len(qs)]


def inference_messages(concepts: list[Concept], question: str, suffix: str = "") -> list[dict]:
    content = []
    for i, c in enumerate(concepts, start=1):
        content += [{"type": "image"}, {"type": "text", "text": reference_line(i, c)}]
    content += [{"type": "image"},
                {"type": "text", "text": f"This is the query image. {question}{suffix}"}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


@dataclass
class Prompt:
    """Model inputs for one prompt.

    input_ids: (T,) int64, one <|image_pad|> per merged patch. pixel_values: (P, 3*2*14*14)
    float32, images concatenated in prompt order. image_grid_thw: (n_images, 3) int64.
    scales: per image (sx, sy) model-input pixels per original pixel. text: the rendered chat
    (one <|image_pad|> per image).
    """
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    scales: list[tuple[float, float]]
    text: str


class ImageError(ValueError):
    """An image file that cannot be decoded or processed; the message names the file."""


RESIZE_RULES = ("none", "multi", "single")
_CACHE_SIZE = 1024
# One process-wide cache of processed images keyed by (content hash, rule, config): reference
# images recur in many rows and across epochs; hashing the file is far cheaper than decoding it.
_image_cache: OrderedDict[tuple[str, str, VisionConfig], ProcessedImage] = OrderedDict()


def _process(im: Image.Image, cfg: VisionConfig, rule: str) -> ProcessedImage:
    size = im.size
    if rule != "none":
        im = repic_resize(im, multi_image=(rule == "multi"))
    return preprocess(im, cfg, original_size=size)


def process_image(image: str | Path | Image.Image, cfg: VisionConfig,
                  rule: str = "none") -> ProcessedImage:
    """Decode (files: EXIF-rotated RGB), resize and patchify one image.

    rule: "multi" / "single" applies RePIC's 512 / 1024 resize first, "none" does not; the
    returned scale always refers to the image as given. Files are cached by content, so
    the result is shared: treat its tensors as read-only.
    """
    if rule not in RESIZE_RULES:
        raise ValueError(f"rule must be one of {RESIZE_RULES}, got {rule!r}")
    if isinstance(image, Image.Image):
        return _process(image.convert("RGB"), cfg, rule)
    try:
        data = Path(image).read_bytes()
        key = (hashlib.sha1(data).hexdigest(), rule, cfg)
        if key in _image_cache:
            _image_cache.move_to_end(key)
            return _image_cache[key]
        out = _process(open_image(io.BytesIO(data)), cfg, rule)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # a file deleted or truncated since validation (which reads headers only), or an odd shape
        raise ImageError(f"image {image}: {type(e).__name__}: {e}") from e
    _image_cache[key] = out
    if len(_image_cache) > _CACHE_SIZE:
        _image_cache.popitem(last=False)
    return out


class PromptBuilder:
    """Turns rows and concept queries into `Prompt`s for one checkpoint directory.

    vision: preprocessing for training prompts (default: the checkpoint's
    preprocessor_config.json). inference_max_pixels: max_pixels for inference prompts (RePIC's
    evaluation used INFERENCE_MAX_PIXELS; None keeps `vision`'s).
    """

    def __init__(self, checkpoint: str | Path, *, vision: VisionConfig | None = None,
                 inference_max_pixels: int | None = None, tokenizer=None):
        self.checkpoint = Path(checkpoint)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.checkpoint)
        self.vision = vision or VisionConfig.from_pretrained(self.checkpoint)
        self.inference_vision = self.vision if inference_max_pixels is None else \
            replace(self.vision, max_pixels=inference_max_pixels)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_pad_id is None or self.image_pad_id == self.tokenizer.unk_token_id:
            raise ValueError(f"{self.checkpoint}: tokenizer has no {IMAGE_PAD} token")

    def training_prompt(self, row: Row, rng: random.Random) -> Prompt:
        text = row.problem + task_suffix(row.method, rng)
        rule = "single" if row.single_image else "multi"
        images = [process_image(p, self.vision, rule) for p in row.images]
        return self.render(training_messages(len(images), text), images)

    def inference_prompt(self, concepts: list[Concept], query_image: str | Path | Image.Image,
                         question: str, suffix: str = "") -> Prompt:
        images = [process_image(c.image, self.inference_vision) for c in concepts]
        images.append(process_image(query_image, self.inference_vision))
        return self.render(inference_messages(concepts, question, suffix), images)

    def render(self, messages: list[dict], images: list[ProcessedImage]) -> Prompt:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        pads = [i for i, t in enumerate(ids) if t == self.image_pad_id]
        if len(pads) != len(images):
            raise ValueError(f"chat template of {self.checkpoint} rendered {len(pads)} image "
                             f"slots for {len(images)} images")
        out: list[int] = []
        start = 0
        for pos, im in zip(pads, images):  # one pad per merged 2x2 patch block
            out += ids[start:pos] + [self.image_pad_id] * im.num_tokens
            start = pos + 1
        out += ids[start:]
        pv = torch.cat([im.pixel_values for im in images]) if images else None
        thw = torch.tensor([im.grid_thw for im in images], dtype=torch.long) if images else None
        return Prompt(torch.tensor(out, dtype=torch.long), pv, thw,
                      [im.scale for im in images], text)


def load_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer with its chat template (tokenizer_config.json,
    chat_template.jinja or the processor's chat_template.json)."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    if not getattr(tok, "chat_template", None):
        jinja, js = checkpoint / "chat_template.jinja", checkpoint / "chat_template.json"
        if jinja.is_file():
            tok.chat_template = jinja.read_text()
        elif js.is_file():
            tok.chat_template = json.loads(js.read_text())["chat_template"]
        else:
            raise ValueError(f"{checkpoint}: no chat template (tokenizer_config.json, "
                             "chat_template.jinja or chat_template.json)")
    return tok
