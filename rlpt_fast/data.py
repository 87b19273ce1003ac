"""RePIC's data formats: training rows, concept databases, evaluation query sets, images.

Training rows (JSON list or JSONL)::

    {"image": "q.jpg" | ["ref1.jpg", ..., "query.jpg"], "problem": "...",
     "solution": "yes" | "<name>" | ["<A>", "<B>"] | [x1, y1, x2, y2],
     "accu_reward_method": "yes_no" | "yes_no_name" | "yes_no_name_multi" | "iou"}

Image paths are relative to the file that names them. RePIC's own files carry paths rooted at
their repository ("./data/database_tot/database_4_concepts/avengers/thor.jpg"); when such a path
does not exist relative to the file, its longest trailing part that does ("avengers/thor.jpg")
is used (or pass ``image_root``, as RePIC's --image_root). Every row is validated before anything
trains (a missing ``accu_reward_method`` is an error; RePIC silently defaults it to "iou"): `load_rows` raises `DataError` listing
each bad row with its file, row and reason, or, with ``skip_invalid=True``, drops and counts them.
Images are opened only when asked for (`open_image`): EXIF-rotated and converted to RGB.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from rlpt_fast.rewards import solution_problem

REQUIRED_FIELDS = ("image", "problem", "solution", "accu_reward_method")
MAX_LISTED = 20  # bad rows spelled out in a DataError's message
PAD_TOKENS = ("<|image_pad|>", "<|video_pad|>")
MAX_ASPECT = 200  # image_processing.smart_resize refuses longer sides (Qwen-VL's processor does too)


@dataclass(frozen=True)
class Row:
    """One validated training row. images: references first, query last.

    single_image is True when the row's "image" was one string (not a list): RePIC resizes
    such images by the 1024 rule and list entries by the 512 rule.
    """
    images: tuple[Path, ...]
    problem: str
    solution: object
    method: str
    source: str  # "file:line N" / "file:item N", for error messages and reward ctx
    single_image: bool


@dataclass(frozen=True)
class RowError:
    file: str
    row: str  # "line 3" (JSONL, 1-based) or "item 2" (JSON list, 0-based)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.row}: {self.reason}"


class DataError(ValueError):
    """Raised with every bad row listed; `errors` holds them as RowError."""

    def __init__(self, errors: list[RowError]):
        self.errors = errors
        # A wrong image root makes every row bad: the first few say why, `errors` holds them all.
        lines = "\n  ".join(str(e) for e in errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        super().__init__(f"{len(errors)} invalid training row(s); nothing was trained "
                         f"(pass skip_invalid=True to drop them):\n  {lines}{more}")


@dataclass
class RowSet:
    """Rows that passed validation, and the skipped ones (skip_invalid=True only)."""
    rows: list[Row]
    skipped: list[RowError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


def resolve_path(name: str, base: Path, root: Path | None = None) -> Path:
    """`name` relative to `base` (or `root` if given); RePIC's repository-rooted paths fall back
    to their longest trailing part that exists there. Returns the plain join if nothing exists."""
    p = Path(name)
    if p.is_absolute():
        return p
    anchor = root if root is not None else base
    parts = [q for q in p.parts if q not in (".", "")]
    for i in range(len(parts)):
        cand = anchor.joinpath(*parts[i:])
        if cand.exists():
            return cand
    return anchor.joinpath(*parts) if parts else anchor


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped); a ValueError naming the file
    and `what` it should hold if it is missing, unreadable or not UTF-8 (never a bare OSError or
    UnicodeDecodeError)."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the {what}: {e}") from None


def read_json(path: str | Path, what: str) -> object:
    """`read_text`, parsed as JSON; a ValueError naming the file, line and column if it is not JSON."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {what} is not valid JSON: {e}") from None


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs; an unparsable JSONL line becomes (where, _BadJson(msg))."""
    try:
        text = read_text(path, "training rows file")
    except ValueError as e:
        raise DataError([RowError(str(path), "file", str(e).removeprefix(f"{path}: "))]) from None
    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"line {n}", _BadJson(str(e))))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError([RowError(str(path), "file", f"not valid JSON: {e}")]) from None
    if not isinstance(data, list):
        raise DataError([RowError(str(path), "file", "expected a JSON list of rows "
                                  f"(or a .jsonl file), got {type(data).__name__}")])
    return [(f"item {i}", r) for i, r in enumerate(data)]


@dataclass(frozen=True)
class _BadJson:
    message: str


def image_problem(path: Path) -> str | None:
    """Why the image cannot be used (missing / unreadable), or None. Reads the header only,
    once per (path, size, mtime): rows share reference images."""
    if not path.is_file():
        return f"image not found: {path}"
    st = path.stat()
    return _header_problem(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8192)
def _header_problem(path: Path, size: int, mtime_ns: int) -> str | None:
    try:
        with Image.open(path) as im:
            w, h = im.size  # header parse; pixels stay on disk
    except Exception as e:  # PIL raises many types for bad files
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT:
        return f"image {path} is {w}x{h}: Qwen-VL needs both sides >= 1 and an aspect ratio up to {MAX_ASPECT}"
    return None


def validate_record(rec: object, base: Path, check_images: bool = True,
                    image_root: Path | None = None) -> tuple[Row | None, list[str]]:
    """Check one raw record; returns (row or None, reasons)."""
    if isinstance(rec, _BadJson):
        return None, [f"not valid JSON: {rec.message}"]
    if not isinstance(rec, dict):
        return None, [f"expected a JSON object, got {type(rec).__name__}"]
    reasons = [f"missing field {k!r}" for k in REQUIRED_FIELDS if k not in rec]
    if reasons:
        return None, reasons
    image, problem, solution, method = (rec[k] for k in REQUIRED_FIELDS)
    names = [image] if isinstance(image, str) else image
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        reasons.append(f"'image' must be a path or a non-empty list of paths, got {image!r}")
    if not isinstance(problem, str):
        reasons.append(f"'problem' must be a string, got {type(problem).__name__}")
    elif reserved := [t for t in PAD_TOKENS if t in problem]:  # would render as an extra image slot
        reasons.append(f"'problem' must not contain {reserved[0]} (Qwen-VL's image/video slot token)")
    if not isinstance(method, str):
        reasons.append(f"'accu_reward_method' must be a string, got {method!r}")
    else:
        why = solution_problem(method, solution)
        if why:
            reasons.append(why)
    if reasons:
        return None, reasons
    paths = tuple(resolve_path(n, base, image_root) for n in names)
    if check_images:
        reasons += [p for p in map(image_problem, paths) if p]
    if reasons:
        return None, reasons
    return Row(paths, problem, solution, method, "", isinstance(image, str)), []


def load_rows(paths: str | Path | list[str | Path], *, skip_invalid: bool = False,
              check_images: bool = True, image_root: str | Path | None = None) -> RowSet:
    """Load and validate training rows from one or more JSON/JSONL files.

    Image paths are relative to each file, or to image_root when given.
    Raises DataError listing every bad row (file, row, reason) unless skip_invalid, in which
    case bad rows are dropped and returned in RowSet.skipped.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows, errors = [], []
    for path in map(Path, paths):
        for where, rec in _read_records(path):
            row, reasons = validate_record(rec, path.parent, check_images,
                                           Path(image_root) if image_root is not None else None)
            errors += [RowError(str(path), where, r) for r in reasons]
            if row is not None:
                rows.append(Row(row.images, row.problem, row.solution, row.method,
                                f"{path}:{where}", row.single_image))
    if errors and not skip_invalid:
        raise DataError(errors)
    return RowSet(rows, errors)


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """Decode an image (a path or a binary file object): EXIF orientation applied, RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


# --------------------------------------------------------------------------- concept databases
@dataclass(frozen=True)
class Concept:
    key: str        # "<ironman>": what ground truth and rewards use
    name: str       # "Iron Man": what the model is shown ("Name: <Iron Man>")
    image: Path     # the reference image
    info: str
    category: str


@dataclass(frozen=True)
class ConceptDatabase:
    path: Path
    concepts: dict[str, Concept]  # in file order (RePIC orders references this way)

    def __getitem__(self, key: str) -> Concept:
        try:
            return self.concepts[key]
        except KeyError:
            raise KeyError(f"{self.path}: no concept {key!r}") from None

    def select(self, keys: list[str] | tuple[str, ...]) -> list[Concept]:
        """The concepts among `keys`, in database order (RePIC's skip-retrieval order)."""
        missing = [k for k in keys if k not in self.concepts]
        if missing:
            raise KeyError(f"{self.path}: unknown concept key(s) {missing}")
        return [c for k, c in self.concepts.items() if k in keys]


def load_database(path: str | Path, *, check_images: bool = True) -> ConceptDatabase:
    """Read a RAP/RePIC database_mod.json; images resolved relative to the file."""
    path = Path(path)
    data = read_json(path, "concept database")
    cdict = data.get("concept_dict") if isinstance(data, dict) else None
    if not isinstance(cdict, dict):
        raise ValueError(f"{path}: expected an object with a 'concept_dict' object")
    concepts, errors = {}, []
    for key, e in cdict.items():
        if not isinstance(e, dict):
            errors.append(f"{path}: concept {key!r}: expected an object with name, image and info, got {e!r}")
            continue
        bad = [k for k in ("name", "image", "info") if not isinstance(e.get(k), str)]
        if bad:
            errors.append(f"{path}: concept {key!r}: missing or non-string field(s) {bad}")
            continue
        img = resolve_path(e["image"], path.parent)
        if check_images and (why := image_problem(img)):
            errors.append(f"{path}: concept {key!r}: {why}")
        concepts[key] = Concept(key, e["name"], img, e["info"], str(e.get("category", "")))
    if errors:
        raise ValueError("invalid concept database:\n  " + "\n  ".join(errors))
    return ConceptDatabase(path, concepts)


# ---------------------------------------------------------------------------- query sets
@dataclass(frozen=True)
class Query:
    image: Path
    concepts: tuple[str, ...]  # ground-truth keys, e.g. ("<Anya>", "<Bond>")


def load_queries(path: str | Path, *, image_root: str | Path | None = None) -> list[Query]:
    """Read a *_query_templates.json: image -> [keys], or image -> [[keys], ...] (4-concept),
    which expands to one Query per subset, in file order. Images are not opened here."""
    path = Path(path)
    data = read_json(path, "query set")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping query image -> concept keys")
    root = Path(image_root) if image_root is not None else None
    out = []
    for img, keys in data.items():
        subsets = keys if keys and all(isinstance(k, list) for k in keys) else [keys]
        for ks in subsets:
            if not (isinstance(ks, list) and ks and all(isinstance(k, str) for k in ks)):
                raise ValueError(f"{path}: query {img!r}: expected a list of concept keys, "
                                 f"got {ks!r}")
            out.append(Query(resolve_path(img, path.parent, root), tuple(ks)))
    return out
