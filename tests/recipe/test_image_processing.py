"""Our Qwen-VL image preprocessing equals transformers' processors, array for array."""
import numpy as np
import pytest
import torch
from PIL import Image

from rlpt_fast.data import open_image
from rlpt_fast.image_processing import (VisionConfig, num_image_tokens, preprocess, repic_resize,
                                        smart_resize)

tv = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

SIZES = [(57, 91), (200, 130), (28, 28), (13, 300), (300, 500)]
SETTINGS = [{}, {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}]


def _images(repic_path=None):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    if repic_path is not None:
        ims.append(open_image(repic_path))
    return ims


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("backend,cls", [("pil", "pil"), ("torch", "tv")])
def test_equal_to_transformers(kw, backend, cls):
    ref = (pil.Qwen2VLImageProcessorPil if cls == "pil" else tv.Qwen2VLImageProcessor)(**kw)
    cfg = VisionConfig(backend=backend, **kw)
    for im in _images():
        ours = preprocess(im, cfg)
        theirs = ref(images=[im], return_tensors="pt")
        assert torch.equal(ours.pixel_values, theirs["pixel_values"]), (backend, im.size)
        assert list(ours.grid_thw) == theirs["image_grid_thw"][0].tolist()
        assert ours.num_tokens == theirs["image_grid_thw"][0].prod().item() // 4
        assert ours.num_tokens == num_image_tokens(*im.size, cfg)


def test_equal_on_a_real_photo(repic):
    im = open_image(repic / "databases/database_2_concepts/Anya.jpg")
    refs = (("pil", pil.Qwen2VLImageProcessorPil()), ("torch", tv.Qwen2VLImageProcessor()))
    for backend, ref in refs:
        ours = preprocess(im, VisionConfig(backend=backend))
        assert torch.equal(ours.pixel_values, ref(images=[im], return_tensors="pt")["pixel_values"])


def test_smart_resize_values():
    assert smart_resize(57, 91) == (56, 84)
    assert smart_resize(10, 10) == (56, 56)                       # min_pixels 3136 -> 56x56
    h, w = smart_resize(4000, 3000, max_pixels=1024 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 1024 * 28 * 28 and (h, w) == (1008, 756)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300)


def test_patch_layout_is_merge_block_ordered():
    """Row r of pixel_values is patch (block_row, block_col, i, j); channel 0 holds value."""
    cfg = VisionConfig(min_pixels=56 * 56, max_pixels=56 * 84)
    arr = np.zeros((56, 84, 3), np.uint8)
    for py in range(4):
        for px in range(6):
            arr[py * 14:(py + 1) * 14, px * 14:(px + 1) * 14, 0] = 10 * py + px
    out = preprocess(Image.fromarray(arr), cfg)
    assert out.grid_thw == (1, 4, 6) and out.pixel_values.shape == (24, 3 * 2 * 14 * 14)
    got = (out.pixel_values[:, 0] * CLIPSTD0 + CLIPMEAN0) * 255
    want = [10 * (2 * br + i) + 2 * bc + j for br in range(2) for bc in range(3)
            for i in range(2) for j in range(2)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=1e-3)
    # temporal patch: the same 14x14 patch twice per channel
    pv = out.pixel_values.reshape(24, 3, 2, 14 * 14)
    assert torch.equal(pv[:, :, 0], pv[:, :, 1])


CLIPMEAN0, CLIPSTD0 = 0.48145466, 0.26862954


def test_scale_and_repic_resize():
    im = Image.new("RGB", (1300, 700))
    assert repic_resize(im, multi_image=True).size == (950, 512)     # int(1300 * 512 / 700)
    assert repic_resize(im, multi_image=False).size == (1901, 1024)  # short side up to 1024
    assert repic_resize(Image.new("RGB", (500, 400)), multi_image=True).size == (500, 400)
    small = repic_resize(im, multi_image=True)
    out = preprocess(small, VisionConfig(), original_size=im.size)
    w, h = out.input_size
    assert out.scale == (w / 1300, h / 700) and out.original_size == (1300, 700)


def test_from_pretrained_reads_preprocessor_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"min_pixels": 784, "max_pixels": 12544, "patch_size": 14, "merge_size": 2,'
        ' "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    cfg = VisionConfig.from_pretrained(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (784, 12544, (0.5, 0.5, 0.5))
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 3136, "longest_edge": 50176}}')
    assert VisionConfig.from_pretrained(tmp_path).max_pixels == 50176
    with pytest.raises(ValueError, match="backend"):
        VisionConfig(backend="cv2")


@pytest.mark.parametrize("text, needle", [("{", "JSONDecodeError"), ('{"merge_size": "two"}', "ValueError"),
                                          ('{"min_pixels": 0}', "min_pixels <= max_pixels"),
                                          ('{"size": 5}', "AttributeError")])
def test_bad_preprocessor_config_names_the_file(tmp_path, text, needle):
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(ValueError, match="preprocessor_config.json: ") as e:
        VisionConfig.from_pretrained(tmp_path)
    assert needle in str(e.value)
