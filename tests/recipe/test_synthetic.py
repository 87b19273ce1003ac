"""The synthetic world: deterministic, fast, and in RePIC's formats end to end."""
import hashlib
import time

import pytest

from rlpt_fast import metrics, synthetic
from rlpt_fast.data import load_database, load_queries, load_rows, open_image
from rlpt_fast.rewards import score


def _digest(files):
    h = hashlib.sha256()
    for p in sorted(files.root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(files.root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_by_seed_and_fast(tmp_path):
    t0 = time.perf_counter()
    a = synthetic.write_world(synthetic.make_world(3), tmp_path / "a")
    elapsed = time.perf_counter() - t0
    b = synthetic.write_world(synthetic.make_world(3), tmp_path / "b")
    c = synthetic.write_world(synthetic.make_world(4), tmp_path / "c")
    assert _digest(a) == _digest(b) != _digest(c)
    assert elapsed < 5.0


def test_world_content():
    w = synthetic.make_world(0, n_concepts=8, n_scenes=60)
    looks = [(c.look.shape, c.look.colour) for c in w.concepts]
    assert len(set(looks)) == 8 and len({c.key for c in w.concepts}) == 8
    assert all(c.key == f"<{c.name}>" for c in w.concepts)
    counts = {len(s.keys) for s in w.scenes}
    assert counts == {0, 1, 2, 3, 4}
    for s in w.scenes:
        boxes = [o.box for o in s.objects]
        assert all(0 <= x1 < x2 <= w.scene_size and 0 <= y1 < y2 <= w.scene_size
                   for x1, y1, x2, y2 in boxes)
        for i, p in enumerate(boxes):   # boxes never overlap
            for q in boxes[i + 1:]:
                assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
        for o in s.objects:             # distractors never look like a concept
            if o.key is None:
                assert (o.look.shape, o.look.colour) not in looks
    # each object is drawn where its box says: its centre shows its colour (or the texture's
    # dark / white marks); a ring's centre is a hole showing the background
    for s in w.scenes[:20]:
        im = synthetic.scene_image(w, s)
        for o in s.objects:
            rgb = synthetic.COLOURS[o.look.colour]
            centre = im.getpixel(((o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2))
            allowed = {s.background} if o.look.shape == "ring" else \
                {rgb, tuple(v // 3 for v in rgb), (255, 255, 255)}
            assert centre in allowed, (o, centre)


def test_more_scenes_continue_the_world_by_their_own_rng():
    w = synthetic.make_world(0, n_concepts=8, n_scenes=60)
    more = synthetic.more_scenes(w, 40, tag="x")
    assert more == synthetic.more_scenes(w, 40, tag="x") != synthetic.more_scenes(w, 40, tag="y")
    assert synthetic.more_scenes(w, 10, tag="x") == more[:10]
    assert [s.index for s in more] == sorted({s.index for s in more}) and more[0].index >= 60
    assert all(s.keys for s in more) and {len(s.keys) for s in more} == {1, 2, 3, 4}
    keys = {c.key for c in w.concepts}
    assert all(set(s.keys) <= keys for s in more)
    assert synthetic.more_scenes(w, 0) == ()
    with pytest.raises(ValueError, match="n must be >= 0"):
        synthetic.more_scenes(w, -1)


def test_round_trip_through_loaders_prompts_rewards_metrics(tmp_path):
    w = synthetic.make_world(1)
    files = synthetic.write_world(w, tmp_path / "world")
    rows = load_rows(files.rows)   # validates every row and opens every image header
    assert {r.method for r in rows} == {"yes_no", "yes_no_name", "yes_no_name_multi", "iou"}
    assert len(rows) == len(synthetic.training_rows(w))
    db = load_database(files.database)
    assert [c.key for c in db.concepts.values()] == [c.key for c in w.concepts]
    assert open_image(db[w.concepts[0].key].image).size == (w.ref_size, w.ref_size)
    queries = load_queries(files.queries)
    assert queries
    assert all(q.image.is_file() and set(q.concepts) <= set(db.concepts) for q in queries)
    # a correct answer earns full reward on every row, in both compat modes
    by_index = {synthetic.scene_path(s): s for s in w.scenes}
    for r in rows:
        scene = by_index[r.images[-1].relative_to(files.root).as_posix()]
        answer = {"yes_no": lambda: r.solution + ".",
                  "iou": lambda: "The box is %s." % list(r.solution)}.get(
            r.method, lambda: synthetic.caption_for(w, scene))()
        for compat in ("repic", "strict"):
            assert score(r.method, answer, r.solution, compat=compat, row=r.source) == 1.0
    # correct captions of the evaluation scenes score 100 under the repic metric
    recs = [metrics.CaptionRecord(str(q.image), q.concepts,
                                  synthetic.caption_for(w, by_index[q.image.relative_to(
                                      files.root).as_posix()])) for q in queries]
    protocol = "single" if all(len(q.concepts) == 1 for q in queries) else "4-concept"
    got = metrics.score_records(recs, protocol)
    assert (got.precision, got.recall) == (100.0, 100.0)


def test_prompts_build_on_the_synthetic_world(tmp_path):
    from rlpt_fast import testing
    from rlpt_fast.image_processing import num_image_tokens
    from rlpt_fast.prompts import PromptBuilder, row_rng

    ck = testing.write_tiny_checkpoint(tmp_path / "ck", arch="qwen2_5_vl")
    w = synthetic.make_world(2)
    files = synthetic.write_world(w, tmp_path / "world")
    b = PromptBuilder(ck)
    rows = load_rows(files.rows)
    for i, r in enumerate(rows.rows[:12]):
        p = b.training_prompt(r, row_rng(0, 0, i))
        n = sum(num_image_tokens(*open_image(x).size, b.vision) for x in r.images)
        assert int((p.input_ids == b.image_pad_id).sum()) == n
        assert p.image_grid_thw.shape == (len(r.images), 3)
        assert p.pixel_values.shape[0] == int(p.image_grid_thw.prod(-1).sum())
    db = load_database(files.database)
    q = load_queries(files.queries)[0]
    p = b.inference_prompt(db.select(q.concepts), q.image, "Give a caption of the image.")
    first = db.select(q.concepts)[0]
    assert f"1. Name: <{first.name}>, Info: {first.info}" in p.text
    assert p.image_grid_thw.shape == (len(q.concepts) + 1, 3)
