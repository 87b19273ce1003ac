"""The demo's world: captions, the non-name check, RePIC rows and rewards, at tiny size."""
import json

import pytest

from rlpt_fast.data import load_rows
from rlpt_fast.demo.rl import rl_rows, write_rl_rows
from rlpt_fast.demo.world import (build_world, caption, content_words, non_name_accuracy,
                                  scene_keys, warm_start_captions)
from rlpt_fast.metrics import CaptionRecord, score_records
from rlpt_fast.rewards import score
from rlpt_fast.synthetic import scene_path


@pytest.fixture(scope="module")
def dw(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), seed=3, n_concepts=5, n_scenes=30)


def test_split_and_queries(dw):
    assert len(dw.train_scenes) + len(dw.eval_scenes) == sum(1 for s in dw.world.scenes if s.keys)
    assert [q.concepts for q in dw.queries] == [tuple(s.keys) for s in dw.eval_scenes]
    for q in dw.queries:
        assert dw.scene_of(q).keys == q.concepts
    assert {c.key for c in dw.world.concepts} == set(dw.database.concepts)


def test_a_larger_held_out_set_keeps_the_training_scenes(tmp_path):
    """The demo holds out 40% of 320 scenes: the same 192 training scenes as 20% of 240."""
    small = build_world(tmp_path / "a", seed=3, n_concepts=5, n_scenes=30, eval_fraction=0.2)
    large = build_world(tmp_path / "b", seed=3, n_concepts=5, n_scenes=40, eval_fraction=0.4)
    assert large.train_scenes == small.train_scenes
    assert large.eval_scenes[:len(small.eval_scenes)] == small.eval_scenes
    assert len(large.queries) > len(small.queries)


def test_pretrain_scenes_are_new_scenes_of_the_cast_and_change_nothing_else(tmp_path):
    plain = build_world(tmp_path / "a", seed=3, n_concepts=5, n_scenes=30)
    more = build_world(tmp_path / "b", seed=3, n_concepts=5, n_scenes=30, n_pretrain_scenes=25)
    assert (more.train_scenes, more.eval_scenes) == (plain.train_scenes, plain.eval_scenes)
    assert [(q.image.name, q.concepts) for q in more.queries] == \
        [(q.image.name, q.concepts) for q in plain.queries]
    assert plain.pretrain_scenes == () and plain.warm_start_scenes == plain.train_scenes
    assert len(more.pretrain_scenes) == 25 and all(s.keys for s in more.pretrain_scenes)
    assert more.warm_start_scenes == more.train_scenes + more.pretrain_scenes
    world_paths = {scene_path(s) for s in more.world.scenes}
    new_paths = {scene_path(s) for s in more.pretrain_scenes}
    assert len(new_paths) == 25 and not new_paths & world_paths  # no held-out scene reused
    assert all((more.files.root / p).is_file() for p in new_paths)
    assert {s.objects for s in more.pretrain_scenes} != {s.objects for s in more.world.scenes[:25]}
    assert (tmp_path / "b" / "train.jsonl").read_text() == (tmp_path / "a" / "train.jsonl").read_text()


def test_captions_name_in_reference_order_and_are_long_enough(dw):
    for sc in dw.world.scenes:
        if not sc.keys:
            continue
        plain, personal = caption(dw.world, sc, False), caption(dw.world, sc, True)
        assert len(plain) >= 100 and len(personal) >= 100  # RePIC's name-reward minimum
        keys = scene_keys(dw.world, sc)
        assert [k for k in dw.database.concepts if k in sc.keys] == keys  # database order
        positions = [personal.index(k) for k in keys]
        assert positions == sorted(positions)
        for k in keys:
            look = dw.world.concept(k).look.describe()
            assert f"{look}, {k}," in personal and look in plain and k not in plain
        assert plain.endswith(" placed together on a plain light background, in a simple scene.")


def test_non_name_words(dw):
    names = dw.names
    sc = next(s for s in dw.eval_scenes if len(s.keys) >= 2)
    plain, personal = caption(dw.world, sc, False), caption(dw.world, sc, True)
    assert content_words(personal, names) == content_words(plain, names)
    assert non_name_accuracy(plain, dw.world, sc) == 1.0
    assert non_name_accuracy(personal, dw.world, sc) == 1.0
    c = dw.world.concept(sc.keys[0])
    wrong = plain.replace(c.look.colour, "mauve", 1)
    n = len(content_words(plain, names))
    assert non_name_accuracy(wrong, dw.world, sc) == pytest.approx(2 * (n - 1) / (2 * n))
    assert non_name_accuracy("", dw.world, sc) == 0.0


def test_rows_and_repic_rewards(dw):
    path = write_rl_rows(dw)
    rows = load_rows(path).rows  # the recipe's validating loader accepts them
    assert len(rows) == len(dw.train_scenes)
    for row, sc in zip(rows, dw.train_scenes):
        keys = scene_keys(dw.world, sc)
        assert row.method == ("yes_no_name_multi" if len(keys) > 1 else "yes_no_name")
        assert row.images[-1].name == f"scene_{sc.index:03d}.png" and len(row.images) == len(keys) + 1
        good, plain = caption(dw.world, sc, True), caption(dw.world, sc, False)
        assert score(row.method, good, row.solution, compat="repic") == 1.0
        assert score(row.method, plain, row.solution, compat="repic") == 0.0
    assert rl_rows(dw) == [json.loads(line) for line in path.read_text().splitlines()]


def test_metric_on_ground_truth_captions(dw):
    recs = [CaptionRecord("q", q.concepts, caption(dw.world, dw.scene_of(q), True)) for q in dw.queries]
    s = score_records(recs, "4-concept")
    assert (s.precision, s.recall, s.f1) == (100.0, 100.0, 100.0)
    recs = [CaptionRecord("q", q.concepts, caption(dw.world, dw.scene_of(q), False)) for q in dw.queries]
    assert score_records(recs, "4-concept").f1 == 0.0


def test_warm_start_captions_deterministic_with_rate(dw):
    a = warm_start_captions(dw.world, dw.train_scenes, 0.2, 40, seed=1)
    assert a == warm_start_captions(dw.world, dw.train_scenes, 0.2, 40, seed=1)
    assert a != warm_start_captions(dw.world, dw.train_scenes, 0.2, 40, seed=2)
    rate = sum("<" in text for _, text, _ in a) / len(a)
    assert 0.15 < rate < 0.25
    assert all("<" not in t for _, t, _ in warm_start_captions(dw.world, dw.train_scenes, 0.0, 3, 1))
