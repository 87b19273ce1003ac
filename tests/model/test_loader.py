"""load_model: both key layouts, both config layouts, shards, ties, dtype; clear errors otherwise."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlpt_fast.model import CheckpointError, ConfigError, load_model
from rlpt_fast.testing import write_tiny_checkpoint

IDS = torch.tensor([1, 50, 60, 70, 80, 90, 100, 110])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", "qwen2_5_vl", seed=3)


@pytest.fixture(scope="module")
def base_logits(base):
    with torch.no_grad():
        return load_model(base).logits(IDS)


def _copy(base, tmp_path):
    return shutil.copytree(base, tmp_path / "copy")


def _rewrite_weights(path, edit):
    file = path / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", [dict(key_layout="old"), dict(config_layout="nested"), dict(shards=3)])
def test_layouts_load_to_the_same_model(tmp_path, base_logits, layout):
    path = write_tiny_checkpoint(tmp_path / "c", "qwen2_5_vl", seed=3, **layout)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).logits(IDS), base_logits, atol=0, rtol=0)


def test_tied_head_shares_the_embedding_and_matches_transformers(tmp_path):
    from transformers import AutoModelForImageTextToText

    path = write_tiny_checkpoint(tmp_path / "t", "qwen2_vl", seed=4, tie_word_embeddings=True, key_layout="old")
    model = load_model(path)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    ref = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.logits(IDS), ref(input_ids=IDS[None]).logits[0], atol=1e-4, rtol=0)


def test_dtype_and_everything_materialised(base, base_logits):
    model = load_model(base, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert not model.model.visual.patch_embed.proj.weight.requires_grad  # vision frozen by default
    with torch.no_grad():
        torch.testing.assert_close(model.logits(IDS).float(), base_logits, atol=0.15, rtol=0.05)


def test_missing_tensor(base, tmp_path):
    path = _copy(base, tmp_path)
    _rewrite_weights(path, lambda s: s.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_unexpected_tensor(base, tmp_path):
    path = _copy(base, tmp_path)
    _rewrite_weights(path, lambda s: s.update({"model.language_model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.language_model\.layers\.0\.extra\.weight'"):
        load_model(path)


def test_wrong_shape(base, tmp_path):
    path = _copy(base, tmp_path)
    _rewrite_weights(path, lambda s: s.update({"model.language_model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.norm\.weight' has shape \(63,\).*\(64,\)"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_file(base, tmp_path, damage):
    path = _copy(base, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_sharded_index_with_a_missing_shard(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "s", "qwen2_vl", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(path)


def test_no_weights_at_all(base, tmp_path):
    path = _copy(base, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"), "unsupported architecture"),
    (lambda c: c.update(use_sliding_window=True), "use_sliding_window"),
    (lambda c: c["rope_scaling"].update(mrope_section=[2, 2, 2]), "mrope_section"),
    (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
])
def test_bad_config(base, tmp_path, edit, message):
    path = _copy(base, tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"config\.json: .*{message}"):
        load_model(path)


def test_code_in_the_directory_never_runs(base, tmp_path, base_logits):
    path = _copy(base, tmp_path)
    (path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.Evil"}
    (path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).logits(IDS), base_logits, atol=0, rtol=0)


def test_built_on_meta_then_materialised_once(base, monkeypatch):
    """No full-size random init: the module is constructed on the meta device."""
    import rlpt_fast
    from rlpt_fast.model import QwenVLModel, loader

    built_on = []

    class Recording(QwenVLModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(loader, "QwenVLModel", Recording)
    model = rlpt_fast.load_model(base)  # the lazy top-level name is this loader
    assert built_on == [{"meta"}] and {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("files", [["pytorch_model.bin"],
                                   ["pytorch_model.bin.index.json", "pytorch_model-00001-of-00001.bin"]])
def test_pickle_checkpoints_are_refused(base, tmp_path, files):
    path = _copy(base, tmp_path)
    (path / "model.safetensors").unlink()
    for name in files:
        (path / name).write_bytes(b"\x80\x02}q\x00.")  # a pickle: must never be unpickled
    with pytest.raises(CheckpointError, match=rf"{files[0]}.*pickle.*safetensors"):
        load_model(path)


def _write_config(path, text):
    (path / "config.json").write_text(text)


@pytest.mark.parametrize("edit, message", [
    (lambda c: "[1, 2]", r"JSON object.*list"),
    (lambda c: "{not json", "not valid JSON"),
    (lambda c: json.dumps({k: v for k, v in c.items() if k != "num_attention_heads"}), "num_attention_heads"),
    (lambda c: json.dumps(dict(c, hidden_size="64")), r"hidden_size.*'64'"),
    (lambda c: json.dumps(dict(c, vision_config=dict(c["vision_config"], depth=None))), r"depth.*None"),
    (lambda c: json.dumps(dict(c, image_token_id=1.5)), "image_token_id"),
    (lambda c: json.dumps(dict(c, vision_config=[])), "vision_config"),
    (lambda c: json.dumps(dict(c, architectures=c["architectures"][0])), "architectures must be a list"),
])
def test_malformed_config_names_the_field(base, tmp_path, edit, message):
    path = _copy(base, tmp_path)
    _write_config(path, edit(json.loads((path / "config.json").read_text())))
    with pytest.raises(ConfigError, match=rf"config\.json: .*{message}"):
        load_model(path)


def test_generation_config_that_is_not_json(base, tmp_path):
    path = _copy(base, tmp_path)
    (path / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"generation_config\.json: not valid JSON"):
        load_model(path)


def test_index_whose_weight_map_is_not_a_mapping(base, tmp_path):
    path = _copy(base, tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*weight_map"):
        load_model(path)


def test_tensor_stored_twice_under_both_layouts(base, tmp_path):
    path = _copy(base, tmp_path)
    _rewrite_weights(path, lambda s: s.update({"model.norm.weight": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*twice"):
        load_model(path)


def test_integer_tensor_for_a_float_weight(base, tmp_path):
    path = _copy(base, tmp_path)
    int_norm = torch.ones(64, dtype=torch.int64)
    _rewrite_weights(path, lambda s: s.update({"model.language_model.norm.weight": int_norm}))
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.norm\.weight' has dtype I64.*float"):
        load_model(path)


def test_a_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Qwen2-VL-2B-Instruct: not a local directory.*downloaded"):
        load_model("Qwen/Qwen2-VL-2B-Instruct")


def test_index_shard_names_stay_inside_the_directory(base, tmp_path):
    path = _copy(base, tmp_path)
    keys = list(load_file(path / "model.safetensors"))
    weight_map = {k: "../copy/model.safetensors" for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"shard '\.\./copy/model\.safetensors'.*plain file name"):
        load_model(path)


def test_missing_untied_head_says_the_config_unties_it(base, tmp_path):
    path = _copy(base, tmp_path)
    _rewrite_weights(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*tie_word_embeddings is false"):
        load_model(path)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.int8])
def test_dtype_must_be_a_floating_torch_dtype(base, dtype):
    with pytest.raises(ValueError, match=r"dtype must be a floating-point torch\.dtype"):
        load_model(base, dtype=dtype)
