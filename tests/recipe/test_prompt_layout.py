"""The inference layout rebuilt from a training row (rlpt_fast/prompt_layout.py): the same model
inputs as `PromptBuilder.inference_prompt` of the same concepts, and errors that name the row."""
import json

import pytest
import torch

from rlpt_fast import synthetic, testing
from rlpt_fast.data import DataError, Row, load_database, load_rows
from rlpt_fast.image_processing import VisionConfig
from rlpt_fast.prompt_layout import (
    QUESTION_DRAWS,
    RowLayoutError,
    check_rows,
    reference_concepts,
    row_prompt,
    row_question,
)
from rlpt_fast.prompts import (
    MULTI_QUESTIONS,
    SINGLE_QUESTIONS,
    SYSTEM_PROMPT,
    PromptBuilder,
    question_for,
    reference_line,
    row_rng,
)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    ck = testing.write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "qwen2vl", arch="qwen2_vl")
    return PromptBuilder(ck, vision=VisionConfig.from_pretrained(ck, backend="torch"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.write_world(synthetic.make_world(0, n_concepts=4, n_scenes=8),
                                 tmp_path_factory.mktemp("world"))


def assert_same_inputs(a, b):
    assert a.text == b.text
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.image_grid_thw, b.image_grid_thw)
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert a.scales == b.scales


def _row(problem, n_images=2, method="yes_no_name_multi", source="f.jsonl:line 3"):
    images = tuple(f"/x/{i}.png" for i in range(n_images))
    return Row(images, problem, ["<A>"], method, source, single_image=False)


def test_synthetic_rows_equal_inference_prompt_of_their_database_concepts(builder, world):
    db = load_database(world.database)
    rows = [r for r in load_rows(world.rows).rows if r.method in ("yes_no_name", "yes_no_name_multi")]
    assert {r.method for r in rows} == {"yes_no_name", "yes_no_name_multi"}
    for i, row in enumerate(rows):
        keys = [row.solution] if isinstance(row.solution, str) else row.solution
        concepts = db.select(keys)
        q = question_for(row_rng(7, 1, i).randrange(QUESTION_DRAWS), len(concepts) > 1)
        want = builder.inference_prompt(concepts, row.images[-1], q)
        got = row_prompt(builder, row, row_rng(7, 1, i), "inference")
        assert_same_inputs(got, want)
        assert got.text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
        assert got.input_ids.numel() > 0 and got.image_grid_thw.shape[0] == len(concepts) + 1
    # the default layout is still RePIC's training prompt
    assert_same_inputs(row_prompt(builder, rows[0], row_rng(0, 0, 0)),
                       builder.training_prompt(rows[0], row_rng(0, 0, 0)))


def test_real_repic_references_round_trip(repic, builder, tmp_path):
    """Real names (spaces, dots), real infos and real images of the 4-concept database, written as
    a RePIC JSONL row and read back by the loader."""
    db = load_database(repic / "databases/database_4_concepts/database_mod.json")
    cases = [(["<ironman>", "<thor>", "<hulk>", "<black widow>"], "group photo_avengers.jpg"),
             (["<mr.krab>", "<spongebob>"], "group photo_spongebob.jpg"),
             (["<thor>"], "group photo_avengers.jpg")]
    lines = []
    for keys, query in cases:
        concepts = db.select(keys)
        problem = "\n".join([reference_line(i, c) for i, c in enumerate(concepts, 1)]
                            + ["Give a personalized caption of the last image."])
        lines.append(json.dumps({"image": [str(c.image) for c in concepts]
                                 + [str(repic / "query-images-4-concepts" / query)],
                                 "problem": problem, "solution": keys if len(keys) > 1 else keys[0],
                                 "accu_reward_method": "yes_no_name_multi" if len(keys) > 1 else "yes_no_name"}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    rows = load_rows(tmp_path / "rows.jsonl").rows
    for i, ((keys, _), row) in enumerate(zip(cases, rows)):
        concepts = db.select(keys)
        parsed = reference_concepts(row)
        assert [(c.name, c.info, c.image) for c in parsed] == [(c.name, c.info, c.image) for c in concepts]
        q = row_question(row_rng(0, 0, i), len(keys))
        assert q in (MULTI_QUESTIONS if len(keys) > 1 else SINGLE_QUESTIONS)
        assert_same_inputs(row_prompt(builder, row, row_rng(0, 0, i), "inference"),
                           builder.inference_prompt(concepts, row.images[-1], q))


def test_question_draw_covers_both_lists_evenly():
    singles = [row_question(row_rng(0, 0, i), 1) for i in range(1200)]
    multis = [row_question(row_rng(0, 0, i), 3) for i in range(1200)]
    assert set(singles) == set(SINGLE_QUESTIONS) and set(multis) == set(MULTI_QUESTIONS)
    for qs, lst in ((singles, SINGLE_QUESTIONS), (multis, MULTI_QUESTIONS)):
        for q in lst:
            assert abs(qs.count(q) / 1200 - 1 / len(lst)) < 0.06  # > 4 sigma at n = 1200


@pytest.mark.parametrize("problem, n_images, needle", [
    ("1. Name: <A> Info: no comma\nCaption it.", 2, "problem line 1: expected 'i. Name: <name>, Info: ...'"),
    ("1. Name: A, Info: no brackets", 2, "expected 'i. Name"),
    ("1. Name: <A>, Info: a\n3. Name: <B>, Info: b", 3, "problem line 2: reference 3 where 2 was expected"),
    ("1. Name: <A>, Info: a\n2. Name: <B>, Info: b", 2, "2 reference line(s) ('i. Name: ...') for 1 reference image"),
    ("1. Name: <A>, Info: a", 3, "1 reference line(s) ('i. Name: ...') for 2 reference image"),
    ("Give a caption.", 2, "no reference line"),
])
def test_malformed_rows_name_the_row_and_the_reason(builder, problem, n_images, needle):
    row = _row(problem, n_images)
    with pytest.raises(RowLayoutError) as e:
        reference_concepts(row)
    assert needle in str(e.value)
    with pytest.raises(RowLayoutError) as e:
        row_prompt(builder, row, row_rng(0, 0, 0), "inference")
    assert str(e.value).startswith("f.jsonl:line 3: ") and needle in str(e.value)


def test_other_lines_are_dropped_and_infos_kept_verbatim():
    row = _row("<image>\n1. Name: <Dr. Who>, Info: A man, Info: with a box.  \nIs it here?", 2)
    (c,) = reference_concepts(row)
    assert (c.key, c.name, c.info, str(c.image)) == ("<Dr. Who>", "Dr. Who", "A man, Info: with a box.  ", "/x/0.png")


def test_check_rows_lists_every_bad_row_or_drops_them(tmp_path):
    good = {"image": ["a.png", "q.png"], "problem": "1. Name: <A>, Info: a\nCaption.", "solution": "<A>",
            "accu_reward_method": "yes_no_name"}
    bad = dict(good, problem="1. Name: <A>, Info: a\n2. Name: <B>, Info: b")
    box = {"image": "q.png", "problem": "Where is <A>?", "solution": [0, 0, 4, 4], "accu_reward_method": "iou"}
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, box, bad)))
    rows = load_rows(f, check_images=False).rows
    assert check_rows(rows, "training") == rows
    with pytest.raises(ValueError, match=r"task\(s\) \['iou'\] \(first: .*rows.jsonl:line 3\).*task_mix"):
        check_rows(rows, "inference")
    with pytest.raises(DataError) as e:
        check_rows(rows, "inference", tasks={"yes_no_name"})
    assert [(x.file, x.row) for x in e.value.errors] == [(str(f), "line 2"), (str(f), "line 4")]
    assert "2 reference line(s)" in str(e.value) and "data.prompt_layout='inference'" in str(e.value)
    kept = check_rows(rows, "inference", tasks={"yes_no_name"}, skip_invalid=True)
    assert kept == [rows[0], rows[2]]  # the box row is never sampled: kept, not checked
    with pytest.raises(ValueError, match="prompt layout must be one of"):
        check_rows(rows, "chat")
