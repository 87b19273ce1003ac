"""data.prompt_layout: the config key, the checks before the model loads, and a step in RePIC's
inference layout whose prompts are `PromptBuilder.inference_prompt` of the rows' concepts."""
import json
import math

import pytest
import torch

import rlpt_fast.train.cli  # noqa: F401  (loaded at collection: see test_config.py's CLI test)
from rlpt_fast.cli import main
from rlpt_fast.data import DataError, load_database
from rlpt_fast.prompt_layout import QUESTION_DRAWS
from rlpt_fast.prompts import SYSTEM_PROMPT, question_for, row_rng
from rlpt_fast.train.config import ConfigError, TrainConfig, load_config
from rlpt_fast.train.stream import PromptStream
from rlpt_fast.train.trainer import Trainer

NAME_TASKS = "--data.task_mix={yes_no_name = 1, yes_no_name_multi = 1}"


def test_key_reads_from_toml_and_overrides_and_rejects_unknown_values(tmp_path):
    assert TrainConfig().data.prompt_layout == "training"  # RePIC's run
    (tmp_path / "run.toml").write_text('[data]\nprompt_layout = "inference"\n')
    c = load_config(tmp_path / "run.toml")
    assert c.data.prompt_layout == "inference"
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert load_config(tmp_path / "run.toml", ["--data.prompt_layout=training"]).data.prompt_layout == "training"
    assert load_config(None, ["--data.prompt_layout=inference"]).data.prompt_layout == "inference"
    assert load_config(None, ["--prompt_layout=inference"]).data.prompt_layout == "inference"
    with pytest.raises(ConfigError, match=r"data.prompt_layout: must be one of \('training', 'inference'\), got 'chat'"):
        load_config(None, ["--data.prompt_layout=chat"])
    (tmp_path / "bad.toml").write_text("[data]\nprompt_layout = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: data.prompt_layout: expected a string, got 1"):
        load_config(tmp_path / "bad.toml")


def test_rlpt_train_rejects_tasks_the_layout_cannot_render_before_loading_the_model(world, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[model]\npath = "nowhere"\n[data]\nfiles = ["{world.rows}"]\n')
    assert main(["train", str(cfg), "--data.prompt_layout=inference", "--train.progress=false"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlpt train: data.prompt_layout='inference'") and "'iou', 'yes_no'" in err, err
    assert "train.jsonl:line 1" in err and "data.task_mix" in err and err.count("\n") == 1, err


def test_malformed_reference_lines_name_the_row_before_loading_the_model(make_config, world, tmp_path):
    rows = [json.loads(x) for x in world.rows.read_text().splitlines()]
    rows = [dict(r, image=[str(world.root / p) for p in r["image"]]) for r in rows if r["accu_reward_method"] == "yes_no_name"]
    rows[1]["problem"] = rows[1]["problem"].replace(", Info:", " Info:")
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        Trainer(make_config("--data.prompt_layout=inference", f"--data.files=['{f}']", "--model.path=/nowhere"))
    assert [(x.file, x.row) for x in e.value.errors] == [(str(f), "line 2")]
    assert "expected 'i. Name: <name>, Info: ...'" in str(e.value)


def test_step_in_inference_layout_renders_the_rows_concepts(make_config, world):
    tr = Trainer(make_config("--data.prompt_layout=inference", NAME_TASKS, "--train.prompts_per_step=3"))
    m = tr.step()
    assert not m["skipped"] and math.isfinite(m["loss"]) and m["step"] == 1
    db = load_database(world.database)
    assert len(tr.last_rollouts) == 3
    picks = PromptStream(tr.rows, tr.cfg.train.seed, shuffle=True, task_mix=tr.cfg.data.task_mix).take(3)
    for (epoch, idx), r in zip(picks, tr.last_rollouts):
        assert r.row is tr.rows[idx]
        keys = [r.row.solution] if isinstance(r.row.solution, str) else r.row.solution
        concepts = db.select(keys)
        q = question_for(row_rng(tr.cfg.train.seed, epoch, idx).randrange(QUESTION_DRAWS), len(keys) > 1)
        want = tr.builder.inference_prompt(concepts, r.row.images[-1], q)
        assert r.prompt.text == want.text and r.prompt.text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
        assert torch.equal(r.prompt.input_ids, want.input_ids)
        assert torch.equal(r.prompt.image_grid_thw, want.image_grid_thw)
        assert len(r.completions) == 4 and len(r.rewards) == 4


@pytest.mark.parametrize("layout", ["training", "inference"])
def test_image_that_breaks_after_validation_names_the_row_and_the_image(ckpt, world, tmp_path, layout):
    import dataclasses
    import random

    from rlpt_fast.data import image_problem, load_rows
    from rlpt_fast.prompt_layout import row_prompt
    from rlpt_fast.prompts import ImageError, PromptBuilder

    row = next(r for r in load_rows(world.rows).rows if r.method == "yes_no_name")
    query = tmp_path / "query.png"
    data = row.images[-1].read_bytes()
    query.write_bytes(data[: len(data) // 2])  # truncated: the header (all validation reads) is intact
    assert image_problem(query) is None
    row = dataclasses.replace(row, images=row.images[:-1] + (query,))
    with pytest.raises(ImageError) as e:
        row_prompt(PromptBuilder(ckpt), row, random.Random(0), layout)
    assert str(e.value).startswith(f"{row.source}: image {query}: ") and "truncated" in str(e.value), str(e.value)


def test_rows_with_an_image_qwen_vl_cannot_take_fail_validation(tmp_path):
    from PIL import Image

    from rlpt_fast.data import load_rows

    Image.new("RGB", (402, 2)).save(tmp_path / "strip.png")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "strip.png", "problem": "p", "solution": "yes",
                                                     "accu_reward_method": "yes_no"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl: line 1: image .*strip.png is 402x2: .*aspect ratio up to 200"):
        load_rows(tmp_path / "rows.jsonl")
