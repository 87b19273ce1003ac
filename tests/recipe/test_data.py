"""Loaders for RePIC's formats: real databases and query sets, and row-by-row validation."""
import json

import pytest
from PIL import Image

from rlpt_fast.data import (DataError, load_database, load_queries, load_rows, open_image,
                            resolve_path)

N_CONCEPTS = {"database_2_concepts": 16, "database_4_concepts": 32, "database_myvlm": 29,
              "database_dreambooth": 30}
N_QUERIES = {"2_concept": 82, "4_concept": 105, "myvlm": 340, "yollava": 333, "dreambooth": 158}


def test_every_real_database_loads(repic):
    dbs = sorted((repic / "databases").glob("*/database_mod.json"))
    assert {p.parent.name for p in dbs} == set(N_CONCEPTS)
    for p in dbs:
        db = load_database(p)  # checks that every reference image exists and parses
        assert len(db.concepts) == N_CONCEPTS[p.parent.name]
        raw = json.loads(p.read_text())
        assert all(raw["concept_dict"][k]["name"] == c.name for k, c in db.concepts.items())
    four = load_database(repic / "databases/database_4_concepts/database_mod.json")
    assert four["<ironman>"].name == "Iron Man"
    assert four["<scarlet witch>"].image.name == "scalet witch.jpg"   # their file-name typo
    assert four["<thor>"].image == repic / "databases/database_4_concepts/avengers/thor.jpg"
    # skip-retrieval references come in database order, not in the query's order
    assert [c.key for c in four.select(["<ironman>", "<thor>"])] == ["<thor>", "<ironman>"]


def test_every_real_query_set_loads(repic):
    for p in sorted((repic / "queries").glob("*_query_templates.json")):
        name = p.name.removesuffix("_query_templates.json")
        root = repic / "query-images-4-concepts" if name == "4_concept" else None
        qs = load_queries(p, image_root=root)
        assert len(qs) == N_QUERIES[name], name
        if name == "4_concept":
            assert all(len(q.concepts) == 4 and q.image.is_file() for q in qs)
            assert sum(4 for _ in qs) == 420
        if name == "2_concept":
            assert qs[0].concepts == ("<Anya>", "<Bond>")


def _write(tmp_path, rows, name="train.jsonl"):
    f = tmp_path / name
    if name.endswith(".jsonl"):
        f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    else:
        f.write_text(json.dumps(rows))
    return f


@pytest.fixture
def imgs(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "img/a.png")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "img/b.jpg")
    (tmp_path / "img/broken.jpg").write_bytes(b"not an image at all")
    return tmp_path


GOOD = [
    {"image": ["img/a.png", "img/b.jpg"], "problem": "Is <A> here?", "solution": "yes",
     "accu_reward_method": "yes_no"},
    {"image": "img/a.png", "problem": "Where is <A>?", "solution": [1, 2, 30, 20],
     "accu_reward_method": "iou"},
    {"image": ["img/a.png", "img/b.jpg"], "problem": "Caption.", "solution": ["<A>", "<B>"],
     "accu_reward_method": "yes_no_name_multi"},
]
BAD = [  # (row, expected reason)
    ({"image": "img/a.png", "problem": "p", "solution": "yes"},
     "missing field 'accu_reward_method'"),
    ({"image": 3, "problem": "p", "solution": "yes", "accu_reward_method": "yes_no"},
     "'image' must be"),
    ({"image": "img/a.png", "problem": ["p"], "solution": "yes", "accu_reward_method": "yes_no"},
     "'problem' must be a string"),
    ({"image": "img/a.png", "problem": "p", "solution": "yes", "accu_reward_method": "caption"},
     "unknown accu_reward_method 'caption'"),
    ({"image": "img/a.png", "problem": "p", "solution": [1, 2, 3], "accu_reward_method": "iou"},
     "4 numbers"),
    ({"image": "img/nope.png", "problem": "p", "solution": "no", "accu_reward_method": "yes_no"},
     "image not found"),
    ({"image": "img/broken.jpg", "problem": "p", "solution": "no", "accu_reward_method": "yes_no"},
     "unreadable image"),
    ("{not json", "not valid JSON"),
    ({"image": "img/a.png", "problem": "Is <A> in <|image_pad|>?", "solution": "no", "accu_reward_method": "yes_no"},
     "must not contain <|image_pad|>"),
]


def test_good_rows_load_with_paths_relative_to_the_file(imgs):
    f = _write(imgs, GOOD, "rows.json")
    rows = load_rows(f)
    assert len(rows) == 3 and rows.skipped == []
    assert rows[0].images == (imgs / "img/a.png", imgs / "img/b.jpg") and not rows[0].single_image
    assert rows[1].single_image and rows[1].solution == [1, 2, 30, 20]
    assert rows[2].source == f"{f}:item 2"
    assert open_image(rows[0].images[1]).mode == "RGB"


def test_image_root_replaces_the_file_directory(imgs, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    f = _write(other, GOOD[1:2], "rows.jsonl")
    with pytest.raises(DataError, match="image not found"):
        load_rows(f)
    assert load_rows(f, image_root=imgs)[0].images == (imgs / "img/a.png",)


def test_all_bad_rows_are_reported_before_anything_runs(imgs):
    f = _write(imgs, GOOD[:1] + [b for b, _ in BAD] + GOOD[1:])
    with pytest.raises(DataError) as e:
        load_rows(f)
    errs = e.value.errors
    assert [(x.row, x.file) for x in errs] == [(f"line {i + 2}", str(f)) for i in range(len(BAD))]
    for err, (_, reason) in zip(errs, BAD):
        assert reason in err.reason, (err, reason)
        assert f"{f}: {err.row}: " in str(e.value)


def test_skip_invalid_counts_bad_rows(imgs):
    f = _write(imgs, GOOD[:1] + [b for b, _ in BAD] + GOOD[1:])
    rows = load_rows(f, skip_invalid=True)
    assert len(rows) == 3 and len(rows.skipped) == len(BAD)
    assert [r.source for r in rows] == [f"{f}:line 1", f"{f}:line {len(BAD) + 2}",
                                        f"{f}:line {len(BAD) + 3}"]


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), "green")
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert open_image(tmp_path / "r.jpg").size == (20, 40)


def test_resolve_path_falls_back_to_trailing_parts(tmp_path):
    (tmp_path / "avengers").mkdir()
    (tmp_path / "avengers/thor.jpg").write_bytes(b"")
    got = resolve_path("./data/database_tot/database_4_concepts/avengers/thor.jpg", tmp_path)
    assert got == tmp_path / "avengers/thor.jpg"
    assert resolve_path("x/y.jpg", tmp_path) == tmp_path / "x/y.jpg"


@pytest.mark.parametrize("content, needle", [
    (None, "training rows file not found"),
    (b"\xff\xfe{}\n", "cannot read the training rows file"),
])
def test_missing_or_undecodable_rows_file_is_a_data_error_naming_it(tmp_path, content, needle):
    f = tmp_path / "rows.jsonl"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_rows(f)
    assert (e.value.errors[0].file, e.value.errors[0].row) == (str(f), "file")
    assert needle in str(e.value) and str(f) in str(e.value)


def test_upper_case_jsonl_suffix_and_a_byte_order_mark_read_as_jsonl(imgs):
    f = _write(imgs, GOOD, "rows.jsonl").rename(imgs / "ROWS.JSONL")
    assert len(load_rows(f)) == 3
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())  # saved by a Windows editor
    assert len(load_rows(f)) == 3


def test_many_bad_rows_list_the_first_ones_and_count_the_rest(imgs):
    f = _write(imgs, [BAD[0][0]] * 50)
    with pytest.raises(DataError) as e:
        load_rows(f)
    msg = str(e.value)
    assert len(e.value.errors) == 50 and msg.startswith("50 invalid training row(s)")
    assert f"{f}: line 20: " in msg and f"{f}: line 21: " not in msg and "... and 30 more" in msg


@pytest.mark.parametrize("text, needle", [
    (None, "concept database not found"),
    ("{", "concept database is not valid JSON: Expecting property name"),
    ('{"concept_dict": {"<A>": "a string"}}', "concept '<A>': expected an object"),
])
def test_bad_database_names_the_file_and_concept(tmp_path, text, needle):
    f = tmp_path / "database_mod.json"
    if text is not None:
        f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_database(f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_bad_query_set_json_names_the_file(tmp_path):
    f = tmp_path / "q.json"
    f.write_text('{"a.png": ["<A>"],}')
    with pytest.raises(ValueError, match=r"q\.json: the query set is not valid JSON: .*line 1"):
        load_queries(f)
