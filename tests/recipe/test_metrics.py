"""The repic caption metric against an independent re-implementation of RePIC's scripts.

`_expected` below is written from RePIC's description (RECIPE.md, evaluation/*.py), directly
and without sharing code with rlpt_fast.metrics: per-row token sets, per-slot decisions, then
counts. Every caption file in data/repic/captioning must give the same P/R/F1 (one decimal,
as their scripts print) and the same counts.
"""
import json
import subprocess
import sys

import pytest

from rlpt_fast import metrics

PUNCT = '.,!?;:()[]{}"\'-'


def _expected(rows, protocol):
    lower = protocol in ("single", "4-concept")
    low = str.lower if lower else (lambda s: s)

    def bare(k):
        return k[1:-1] if k[:1] == "<" and k[-1:] == ">" else k

    gts_of = (lambda r: r[1][:1]) if protocol == "single" else (lambda r: r[1])
    pool = set()
    for r in rows:
        pool.update(gts_of(r))
    correct = predicted = slots = 0
    for r in rows:
        text = low(r[2].replace("</s>", ""))
        toks = set()
        for w in text.split():
            w = w.strip(PUNCT)
            if w:
                toks.add(w)
        found = set()
        for c in pool:
            if low(c) in toks or bare(low(c)) in toks:
                found.add(bare(low(c)))
        if protocol == "single":
            non_gt = {bare(low(c)) for c in pool} - {bare(low(r[1][0]))}
        else:
            non_gt = {bare(low(c)) for c in pool if c not in r[1]}
        wrong = len(found & non_gt) > 0
        for g in gts_of(r):
            slots += 1
            if bare(low(g)) in found:
                correct += 1
                predicted += 1
            elif wrong:
                predicted += 1
    p = correct / predicted if predicted else 0.0
    rc = correct / slots
    f = 2 * p * rc / (p + rc) if p + rc else 0.0
    return f"{p * 100:5.1f} / {rc * 100:5.1f} / {f * 100:5.1f}", (correct, predicted, slots)


def _files(repic):
    cap = repic / "captioning"
    return ([("2-concept", f) for f in sorted((cap / "double_concept").glob("*.json"))]
            + [("4-concept", f) for f in sorted((cap / "quad_concept").glob("*.json"))])


def test_repic_metric_matches_their_algorithm_on_all_ten_files(repic):
    files = _files(repic)
    assert len(files) == 10
    for protocol, f in files:
        rows = json.loads(f.read_text())
        want, counts = _expected(rows, protocol)
        got = metrics.score_file(f, protocol)
        assert got.line().endswith(want), (f.name, got.line(), want)
        assert (got.correct, got.predicted, got.slots) == counts, f.name
    # RePIC's ranking on their own files (RECIPE.md): ours > RAP-LLaVA > SFT > zero-shot, 2-concept.
    by = {f.name: metrics.score_file(f, p).f1 for p, f in files if p == "2-concept"}
    others = max(v for k, v in by.items() if "ours" not in k)
    assert by["captioning-skip-retrieval-ours.json"] > others


def test_single_protocol_lowercases_and_uses_first_key_only():
    rows = [["a.jpg", ["<Cat>"], "my CAT sleeps"], ["b.jpg", ["<dog>", "<x>"], "the Dog, and <x>"],
            ["c.jpg", ["<bird>"], "a cat on a branch"], ["d.jpg", ["<dog>"], "nothing here"]]
    recs = [metrics.CaptionRecord(r[0], tuple(r[1]), r[2]) for r in rows]
    got = metrics.score_records(recs, "single")
    want, counts = _expected(rows, "single")
    assert (got.correct, got.predicted, got.slots) == counts == (2, 3, 4)
    assert got.line().endswith(want)


def test_two_concept_is_case_sensitive_and_miss_needs_a_non_gt_concept():
    rows = [["a", ["<Anya>", "<Bond>"], "anya hugs <Bond>."],      # anya: lower-case -> not found
            ["b", ["<Anya>", "<Bond>"], "Anya and Bingo"],        # Bond missing, Bingo -> MISS
            ["c", ["<Bingo>", "<Bluey>"], "Bluey's toy"]]         # possessive never matches
    recs = [metrics.CaptionRecord(r[0], tuple(r[1]), r[2]) for r in rows]
    got = metrics.score_records(recs, "2-concept")
    assert (got.correct, got.predicted, got.slots) == _expected(rows, "2-concept")[1] == (2, 3, 6)


def test_strict_matches_shown_names_phrases_and_case(repic):
    db = metrics.load_concept_names(repic / "databases/database_4_concepts/database_mod.json")
    rec = metrics.CaptionRecord("q", ("<ironman>", "<black widow>", "<mr.krab>", "<thor>"),
                                "<Iron Man> and Black Widow talk to Mr. Krabs' friend, THOR!")
    strict = metrics.score_records([rec], "4-concept", strict=True, database=db)
    repic_s = metrics.score_records([rec], "4-concept")
    assert (strict.correct, strict.predicted) == (4, 4)   # 3 of them unreachable for RePIC's rule
    assert (repic_s.correct, repic_s.predicted) == (1, 1)


def test_strict_lifts_repic_4_concept_recall(repic):
    f = repic / "captioning/quad_concept/captioning-skip-retrieval-ours.json"
    db = metrics.load_concept_names(repic / "databases/database_4_concepts/database_mod.json")
    assert metrics.score_file(f, "4-concept", strict=True, database=db).recall > \
        metrics.score_file(f, "4-concept").recall + 20


def test_cli_prints_their_line_and_json(repic, tmp_path):
    f = repic / "captioning/double_concept/captioning-skip-retrieval-ours.json"
    want, counts = _expected(json.loads(f.read_text()), "2-concept")
    out = subprocess.run([sys.executable, "-c", "from rlpt_fast.cli import main; main()",
                          "score-captions", str(f), "--protocol", "2-concept"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith(want) and f.name in out
    out = subprocess.run([sys.executable, "-c", "from rlpt_fast.cli import main; main()",
                          "score-captions", str(f), str(f), "--protocol", "2-concept", "--json",
                          "--strict", "--database",
                          str(repic / "databases/database_2_concepts/database_mod.json")],
                         capture_output=True, text=True, check=True).stdout
    objs = [json.loads(line) for line in out.splitlines()]
    assert len(objs) == 2 and objs[0]["file"] == str(f)
    assert (objs[0]["correct"], objs[0]["predicted"], objs[0]["slots"]) == counts
    assert f"{objs[0]['f1']:5.1f}" == want.split("/")[-1].strip().rjust(5)
    assert objs[0]["strict"]["recall"] >= objs[0]["recall"]


def test_bad_caption_row_names_file_and_row(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps([["a", ["<A>"], "x"], ["b", "<A>", "y"]]))
    with pytest.raises(ValueError, match=r"c\.json: row 1"):
        metrics.load_captions(f)


def test_cli_reports_unreadable_files_by_name_and_scores_the_rest(tmp_path, capsys):
    from rlpt_fast.cli import main

    good, torn, db = tmp_path / "good.json", tmp_path / "torn.json", tmp_path / "db.json"
    good.write_text(json.dumps([["a.png", ["<A>"], "A photo of <A>.", "q"]]))
    torn.write_text('[["a.png", ["<A>"], "A pho')
    argv = ["score-captions", str(tmp_path / "absent.json"), str(torn), str(good), "--protocol", "single", "--json"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["file"] for line in out.splitlines()] == [str(good)]
    assert f"{tmp_path / 'absent.json'}: caption file not found" in err
    assert f"{torn}: the caption file is not valid JSON" in err

    db.write_text(json.dumps({"concept_dict": {"<A>": "A"}}))
    assert main(argv[:3] + ["--protocol", "single", "--strict", "--database", str(db)]) == 1
    assert f"{db}: concept(s) ['<A>'] are not objects" in capsys.readouterr().err
