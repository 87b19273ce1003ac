"""`rlpt caption` writes RePIC's caption format, greedy captions, and score-captions scores it."""
import json
import os
from pathlib import Path

import pytest
import torch

from rlpt_fast.cli import main
from rlpt_fast.data import load_database, load_queries
from rlpt_fast.metrics import load_captions, score_records
from rlpt_fast.model import load_model
from rlpt_fast.prompts import SINGLE_QUESTIONS, PromptBuilder


def greedy(model, prompt, max_new: int, eos: set[int]) -> list[int]:
    """Plain greedy decoding with full dense forwards (no KV cache): the reference."""
    ids, out = prompt.input_ids, []
    for _ in range(max_new):
        nxt = int(model.logits(torch.cat([ids, torch.tensor(out, dtype=torch.long)]),
                               prompt.pixel_values, prompt.image_grid_thw)[-1].argmax())
        out.append(nxt)
        if nxt in eos:
            break
    return out


def test_caption_file_is_repics_format_and_scores(tmp_path, ckpt, world, capsys):
    out = tmp_path / "caps.json"
    rc = main(["caption", "--model", str(ckpt), "--database", str(world.database), "--queries", str(world.queries),
               "--out", str(out), "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"])
    assert rc == 0
    rows = json.loads(out.read_text())
    spec = json.loads(world.queries.read_text())
    assert [r[0] for r in rows] == list(spec) and [r[1] for r in rows] == list(spec.values())
    assert [r[3] for r in rows] == [SINGLE_QUESTIONS[i % 4] for i in range(len(rows))]

    model, builder = load_model(ckpt).eval(), PromptBuilder(ckpt, inference_max_pixels=1024 * 28 * 28)
    db = load_database(world.database)
    eos = set(model.config.eos_token_ids)
    with torch.no_grad():
        for row, q in zip(rows, load_queries(world.queries)):
            prompt = builder.inference_prompt(db.select(list(q.concepts)), q.image, row[3])
            want = builder.tokenizer.decode(greedy(model, prompt, 6, eos), skip_special_tokens=True).strip()
            assert row[2] == want

    # score-captions reads the file; with a caption naming the concept it scores that slot
    rows[0][2] = f"A photo of {rows[0][1][0]} on a table."
    out.write_text(json.dumps(rows))
    capsys.readouterr()
    assert main(["score-captions", str(out), "--protocol", "2-concept", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = score_records(load_captions(out), "2-concept")
    assert (got["recall"], got["slots"], got["correct"]) == (round(want.recall, 4), want.slots, want.correct)
    assert got["correct"] >= 1 and got["slots"] == sum(len(r[1]) for r in rows)


REPIC = Path(os.environ.get("RLPT_REPIC_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data" / "repic"))


@pytest.mark.skipif(not (REPIC / "queries" / "4_concept_query_templates.json").is_file(), reason="RePIC data absent (../shared/data/repic or $RLPT_REPIC_DATA); runs on the dev machine and in CI, which have it")
def test_caption_rows_line_up_with_repics_own_caption_file(tmp_path, ckpt):
    """On RePIC's 4-concept set: image strings, keys and questions in the order of their file."""
    out = tmp_path / "caps4.json"
    rc = main(["caption", "--model", str(ckpt), "--database",
               str(REPIC / "databases" / "database_4_concepts" / "database_mod.json"),
               "--queries", str(REPIC / "queries" / "4_concept_query_templates.json"),
               "--image-root", str(REPIC / "query-images-4-concepts"), "--out", str(out),
               "--max-new-tokens", "2", "--max-pixels", str(64 * 28 * 28), "--limit", "3"])
    assert rc == 0
    ours = json.loads(out.read_text())
    theirs = json.loads((REPIC / "captioning" / "quad_concept" / "captioning-skip-retrieval-ours.json").read_text())
    assert [[r[0], r[1], r[3]] for r in ours] == [[r[0], r[1], r[3]] for r in theirs[:3]]



def _caption_argv(ckpt, world, out, **changes):
    args = {"--model": str(ckpt), "--database": str(world.database), "--queries": str(world.queries),
            "--out": str(out), "--max-new-tokens": "2", "--device": "cpu", **changes}
    return ["caption"] + [x for kv in args.items() for x in kv]


def test_bad_inputs_fail_in_one_line_before_the_model_loads_and_keep_the_old_output(tmp_path, ckpt, world, capsys):
    out = tmp_path / "caps.json"
    out.write_text("[]")  # an earlier run's file: a failed run must not touch it
    spec = json.loads(world.queries.read_text())
    first_image, first_keys = next(iter(spec.items()))
    db = json.loads(world.database.read_text())
    del db["concept_dict"][first_keys[0]]
    short_db = world.database.with_name("short_db.json")  # beside the original: reference paths resolve
    short_db.write_text(json.dumps(db))
    bad_json = tmp_path / "torn.json"
    bad_json.write_text('{"a.png": [')
    cases = [
        ({"--database": str(short_db)}, [f"query {first_image!r}", f"{first_keys[0]}", "not in", str(short_db)]),
        ({"--database": str(bad_json)}, [str(bad_json), "concept database is not valid JSON"]),
        ({"--queries": str(tmp_path / "absent.json")}, ["absent.json: query set not found"]),
        ({"--image-root": str(tmp_path)}, ["image not found", str(tmp_path)]),
        ({"--model": str(tmp_path / "no_model")}, ["no_model"]),
        ({"--adapter": str(tmp_path / "no_adapter")}, ["--adapter", "no_adapter"]),
    ]
    for change, needles in cases:
        assert main(_caption_argv(ckpt, world, out, **change)) == 1, change
        err = capsys.readouterr().err
        assert err.startswith("rlpt caption: ") and all(n in err for n in needles), (change, err)
        assert "Traceback" not in err
    assert out.read_text() == "[]"


def _six_queries(world) -> Path:
    spec = json.loads(world.queries.read_text())
    queries = world.queries.with_name("queries_x3.json")  # beside the original: image paths resolve
    queries.write_text(json.dumps({img: [keys] * 3 for img, keys in spec.items()}))  # 3 queries per image
    return queries


def _stop_at_second_chunk(monkeypatch, argv) -> None:
    from rlpt_fast.rollout import Engine

    real, calls = Engine.generate, []

    def generate(self, requests, params=None):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, requests, params)
    with monkeypatch.context() as m:
        m.setattr(Engine, "generate", generate)
        with pytest.raises(KeyboardInterrupt):
            main(argv)


def test_a_rerun_with_a_smaller_limit_keeps_the_captions_past_it(tmp_path, ckpt, world, monkeypatch, capsys):
    out, partial = tmp_path / "caps.json", tmp_path / "caps.json.partial.jsonl"
    args = {"--queries": str(_six_queries(world)), "--chunk-size": "2"}
    _stop_at_second_chunk(monkeypatch, _caption_argv(ckpt, world, out, **args))
    first_chunk = partial.read_text()
    capsys.readouterr()
    assert main(_caption_argv(ckpt, world, out, **args, **{"--limit": "1"})) == 0  # all read, none generated
    assert len(json.loads(out.read_text())) == 1
    assert f"kept {partial}: it holds 1 caption(s) past these 1 queries" in capsys.readouterr().err
    assert partial.read_text() == first_chunk


def test_a_stopped_run_keeps_its_chunks_and_the_rerun_generates_only_the_rest(tmp_path, ckpt, world, monkeypatch,
                                                                               capsys):
    from rlpt_fast.rollout import Engine

    args = {"--queries": str(_six_queries(world)), "--chunk-size": "2"}
    full = tmp_path / "full.json"
    assert main(_caption_argv(ckpt, world, full, **args)) == 0  # uninterrupted
    want = json.loads(full.read_text())
    assert len(want) == 6  # 3 chunks

    real, calls, fail = Engine.generate, [], {"at": 2}

    def generate(self, requests, params=None):
        calls.append(len(requests))
        if len(calls) == fail["at"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, requests, params)
    monkeypatch.setattr(Engine, "generate", generate)
    out, partial = tmp_path / "caps.json", tmp_path / "caps.json.partial.jsonl"
    argv = _caption_argv(ckpt, world, out, **args)
    capsys.readouterr()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        main(argv)
    assert not out.exists()
    lines = [json.loads(x) for x in partial.read_text().splitlines()]
    assert lines[0]["run"]["max_new_tokens"] == 2
    assert [(x["index"], x["row"]) for x in lines[1:]] == [(0, want[0]), (1, want[1])]  # the first chunk
    assert f"2 captions done are kept in {partial}" in capsys.readouterr().err

    with partial.open("a") as f:  # a kill in the middle of an append leaves a torn line
        f.write('{"index": 2, "row": ["x.png"')
    kept = partial.read_text()
    assert main(_caption_argv(ckpt, world, out, **args, **{"--max-new-tokens": "3"})) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rlpt caption: {partial}: ") and "max_new_tokens" in err and "delete it" in err
    assert partial.read_text() == kept and not out.exists()  # a refused run changes nothing

    calls.clear()
    fail["at"] = 0
    assert main(argv) == 0
    assert out.read_text() == full.read_text()
    assert calls == [2, 2]  # the first chunk was not generated again
    assert not partial.exists()
    assert f"2 of 6 captions read from {partial}" in capsys.readouterr().err


def test_a_partial_file_of_an_unknown_kind_is_refused_not_overwritten(tmp_path, ckpt, world, capsys):
    out, partial = tmp_path / "caps.json", tmp_path / "caps.json.partial.jsonl"
    partial.write_text('{"something": "else"}\n')
    assert main(_caption_argv(ckpt, world, out)) == 1
    err = capsys.readouterr().err
    assert f"{partial}" in err and "line 1" in err and "delete it" in err
    assert partial.read_text() == '{"something": "else"}\n'
