"""Personalized-caption metrics: RePIC's name precision / recall / F1, and a strict variant.

RePIC's evaluation scripts (evaluation/eval_{single_concept,multi_2_concept,multi_4_concept}.py)
read caption files whose rows are ``[query_image, [gt concept keys], caption, question]`` and
score, per ground-truth slot, whether the caption names the concept:

* tokens: the caption with "</s>" removed, split on whitespace, ``.,!?;:()[]{}"'-`` stripped from
  both ends of each token (empty tokens dropped);
* a concept is present if its key ("<Anya>") or bare name ("Anya") equals a token;
* each slot predicts its concept if present, else "MISS" if a concept of the file's candidate
  pool that is not among the row's ground truth is present, else nothing;
* precision = correct / slots with a prediction (MISS included), recall = correct / slots.

Per protocol: "single" scores only the first key of each row and lower-cases everything; its
pool is the set of those first keys. "2-concept" is case-sensitive. "4-concept" lower-cases.
`score_records(..., strict=True)` additionally matches the name the model was shown (the
database's ``name`` field, e.g. "<ironman>" is shown as "Iron Man"), matches names with spaces or
dots as token phrases (a dot separates words), ignores case, ``<>`` around tokens and a
trailing possessive "'s".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rlpt_fast.data import read_json

PROTOCOLS = ("single", "2-concept", "4-concept")
PUNCT_STRIP = '.,!?;:()[]{}"\'-'
_STRICT_STRIP = PUNCT_STRIP + "<>*`"
_POSSESSIVE = re.compile(r"['\u2019]s$")


@dataclass(frozen=True)
class CaptionRecord:
    """One row of a caption file. concepts: ground-truth keys like "<Anya>"."""
    image: str
    concepts: tuple[str, ...]
    caption: str
    question: str = ""


@dataclass(frozen=True)
class FileScore:
    """Metric of one caption file. precision/recall/f1 are percentages (0-100)."""
    file: str
    precision: float
    recall: float
    f1: float
    slots: int
    predicted: int
    correct: int
    protocol: str
    strict: bool

    def line(self) -> str:
        """The line RePIC's scripts print for this file (one decimal, width 5)."""
        return (f"file: {Path(self.file).name:<60}  metric (P/R/F1): "
                f"{self.precision:5.1f} / {self.recall:5.1f} / {self.f1:5.1f}")


def load_captions(path: str | Path) -> list[CaptionRecord]:
    """Read a RePIC caption file; errors name the file and the row."""
    path = Path(path)
    rows = read_json(path, "caption file")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of [image, [concepts], caption, ...] rows")
    records = []
    for i, row in enumerate(rows):
        ok = isinstance(row, list) and len(row) >= 3 and isinstance(row[1], list) \
            and len(row[1]) > 0 and all(isinstance(c, str) for c in row[1]) \
            and isinstance(row[2], str)
        if not ok:
            raise ValueError(f"{path}: row {i}: expected [image, [concept keys], caption, ...], "
                             f"got {json.dumps(row)[:200]}")
        question = row[3] if len(row) > 3 and isinstance(row[3], str) else ""
        records.append(CaptionRecord(str(row[0]), tuple(row[1]), row[2], question))
    return records


def _strip_brackets(key: str) -> str:
    return key[1:-1] if key.startswith("<") and key.endswith(">") else key


def repic_tokens(caption: str, lower: bool) -> set[str]:
    caption = caption.replace("</s>", "")
    if lower:
        caption = caption.lower()
    return {w.strip(PUNCT_STRIP) for w in caption.split() if w.strip(PUNCT_STRIP)}


def _repic_slots(rec: CaptionRecord, pool: list[str],
                 protocol: str) -> list[tuple[str | None, str]]:
    """(prediction, target) per ground-truth slot, in RePIC's bracket-stripped form."""
    lower = protocol != "2-concept"
    norm = (lambda s: s.lower()) if lower else (lambda s: s)
    tokens = repic_tokens(rec.caption, lower)
    present = {_strip_brackets(norm(c)) for c in pool
               if norm(c) in tokens or _strip_brackets(norm(c)) in tokens}
    gts = rec.concepts[:1] if protocol == "single" else rec.concepts
    targets = [_strip_brackets(norm(g)) for g in gts]
    if protocol == "single":
        others = {_strip_brackets(norm(c)) for c in pool} - {targets[0]}
    else:  # membership is tested on the original strings, then normalized (as their scripts)
        others = {_strip_brackets(norm(c)) for c in pool if c not in rec.concepts}
    miss = bool(present & others)
    return [(t if t in present else ("MISS" if miss else None), t) for t in targets]


def _phrase_tokens(text: str) -> list[str]:
    # Dots split words too, so "Mr.Krabs", "Mr. Krabs" and "mr.krabs" are the same phrase.
    out = []
    for w in text.replace("</s>", "").lower().replace(".", " ").split():
        w = _POSSESSIVE.sub("", w.strip(_STRICT_STRIP)).strip(_STRICT_STRIP)
        if w:
            out.append(w)
    return out


def _contains(tokens: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(tokens[i:i + n] == phrase for i in range(len(tokens) - n + 1))


def _strict_forms(key: str, database: dict | None) -> list[list[str]]:
    forms = {key, _strip_brackets(key)}
    entry = (database or {}).get(key) or (database or {}).get(key.lower())
    if entry is not None and entry.get("name"):
        forms.add(str(entry["name"]))
    return [p for p in (_phrase_tokens(f) for f in sorted(forms)) if p]


def _strict_slots(rec: CaptionRecord, forms: dict[str, list[list[str]]],
                  protocol: str) -> list[tuple[str | None, str]]:
    tokens = _phrase_tokens(rec.caption)
    present = {c.lower() for c, fs in forms.items() if any(_contains(tokens, f) for f in fs)}
    gts = [g.lower() for g in (rec.concepts[:1] if protocol == "single" else rec.concepts)]
    miss = bool(present - set(gts))
    return [(g if g in present else ("MISS" if miss else None), g) for g in gts]


def score_records(records: list[CaptionRecord], protocol: str, *, strict: bool = False,
                  database: dict | None = None, file: str = "") -> FileScore:
    """Score caption records. database: a `concept_dict` (key -> {"name", ...}), strict only."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    firsts = [r.concepts[:1] if protocol == "single" else r.concepts for r in records]
    pool = sorted({c for cs in firsts for c in cs})
    forms = {c: _strict_forms(c, database) for c in pool}
    slots = []
    for rec in records:
        slots += (_strict_slots(rec, forms, protocol) if strict
                  else _repic_slots(rec, pool, protocol))
    correct = sum(1 for p, t in slots if p is not None and p != "MISS" and p == t)
    predicted = sum(1 for p, _ in slots if p is not None)
    precision = correct / predicted if predicted else 0.0
    recall = correct / len(slots) if slots else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return FileScore(file, 100 * precision, 100 * recall, 100 * f1, len(slots), predicted,
                     correct, protocol, strict)


def score_file(path: str | Path, protocol: str, *, strict: bool = False,
               database: dict | None = None) -> FileScore:
    return score_records(load_captions(path), protocol, strict=strict, database=database,
                         file=str(path))


def load_concept_names(database_path: str | Path) -> dict:
    """The `concept_dict` of a database_mod.json (key -> {"name", "info", ...})."""
    data = read_json(database_path, "concept database")
    if not isinstance(data, dict) or not isinstance(data.get("concept_dict"), dict):
        raise ValueError(f"{database_path}: expected a database with a 'concept_dict' object")
    bad = [k for k, e in data["concept_dict"].items() if not isinstance(e, dict)]
    if bad:
        raise ValueError(f"{database_path}: concept(s) {bad[:5]} are not objects with a 'name' field")
    return data["concept_dict"]


# ----------------------------------------------------------------------- CLI: rlpt score-captions
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="RePIC caption files (JSON)")
    p.add_argument("--protocol", required=True, choices=PROTOCOLS,
                   help="which RePIC evaluation script to reproduce")
    p.add_argument("--strict", action="store_true",
                   help="also report the strict metric (shown names, phrases, any case)")
    p.add_argument("--database", help="database_mod.json whose 'name' fields --strict matches")
    p.add_argument("--json", action="store_true", help="one JSON object per file")


def run(args: argparse.Namespace) -> int:
    """Scores every file it can read; a bad file is reported on stderr (naming it and why) and
    the others are still scored. Exit status 1 if any file (or --database) was bad."""
    if args.database and not args.strict:
        raise SystemExit("--database is only used with --strict")
    try:
        database = load_concept_names(args.database) if args.database else None
    except ValueError as e:
        print(f"rlpt score-captions: {e}", file=sys.stderr)
        return 1
    failed = 0
    for f in args.files:
        try:
            records = load_captions(f)
        except ValueError as e:
            print(f"rlpt score-captions: {e}", file=sys.stderr)
            failed += 1
            continue
        repic = score_records(records, args.protocol, file=f)
        strict = score_records(records, args.protocol, strict=True, database=database,
                               file=f) if args.strict else None
        if args.json:
            obj = _json_obj(repic)
            if strict is not None:
                obj["strict"] = _json_obj(strict)
            print(json.dumps(obj))
        else:
            print(repic.line())
            if strict is not None:
                print(strict.line().replace("metric (P/R/F1)", "strict (P/R/F1)"))
    return 1 if failed else 0


def _json_obj(s: FileScore) -> dict:
    d = asdict(s)
    for k in ("precision", "recall", "f1"):
        d[k] = round(d[k], 4)
    return d
