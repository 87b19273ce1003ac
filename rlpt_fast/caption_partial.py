"""What keeps `rlpt caption`'s finished captions when a run stops part way (out of memory, a kill).

OUT.partial.jsonl, beside the caption file: a header line

    {"rlpt_caption_partial": 1, "run": {what decides the captions: model and adapter files,
                                        database and query contents, decoding options}}

then one line per caption, {"index": query index, "row": [image, [keys], caption, question]},
appended a chunk at a time and fsync'd. A rerun of the same command reads it, generates only the
queries not in it, and removes it once the caption file is written. A rerun that would caption
differently is refused with the fields that differ, the file untouched. A last line cut short by a
kill in the middle of an append is dropped (cut from the file, so the next append starts clean).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = 1
DELETE = "delete it to start over"


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl")


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def dir_stamp(path: str | Path | None) -> str | None:
    """Names, sizes and modification times of a checkpoint directory's files: a directory saved
    again in place (an adapter of a re-saved step) changes it, and no weight is read.
    None for no directory (the loader names that fault)."""
    if path is None or not Path(path).is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class PartialCaptions:
    """The side file of one caption run. identity: what decides the captions (JSON values)."""

    def __init__(self, path: Path):
        self.path = path
        self.identity: dict | None = None
        self.done: dict[int, list] = {}  # query index -> caption row, loaded and appended

    def load(self, identity: dict) -> dict[int, list]:
        """The rows a stopped run of the same command left ({} with no file); a ValueError naming
        the file when another run wrote it or a line is not what this module writes."""
        self.identity = identity
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        whole = data[:data.rfind(b"\n") + 1]
        lines = [self._parse(n, line) for n, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1)]
        self._check_header(lines[0] if lines else None)
        rows = {}
        for n, line in enumerate(lines[1:], 2):
            i, row = line.get("index"), line.get("row")
            if not (isinstance(i, int) and i >= 0 and isinstance(row, list) and len(row) == 4):
                raise ValueError(f"{self.path}:line {n}: expected {{\"index\": i, \"row\": [image, keys, "
                                 f"caption, question]}}; {DELETE}")
            rows[i] = row
        if len(whole) < len(data):  # the torn tail of a killed append
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        self.done = rows
        return dict(rows)

    def _parse(self, n: int, line: str) -> dict:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}:line {n}: not JSON ({e.msg}); {DELETE}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{self.path}:line {n}: expected a JSON object; {DELETE}")
        return value

    def _check_header(self, header: dict | None) -> None:
        if header is None or header.get("rlpt_caption_partial") != FORMAT or not isinstance(header.get("run"), dict):
            raise ValueError(f"{self.path}:line 1: not the header of an rlpt caption partial file "
                             f"(version {FORMAT}); {DELETE}")
        run = header["run"]
        differ = sorted(k for k in run.keys() | self.identity.keys() if run.get(k) != self.identity.get(k))
        if differ:
            raise ValueError(f"{self.path}: holds captions of a different run ({', '.join(differ)} differ): "
                             f"rerun with that run's arguments to finish it, or {DELETE}")

    def append(self, items: list[tuple[int, list]]) -> None:
        """Adds a finished chunk's (index, row) pairs, on disk before this returns."""
        if not self.path.exists():
            write_atomic(self.path, json.dumps({"rlpt_caption_partial": FORMAT, "run": self.identity}) + "\n")
        text = "".join(json.dumps({"index": i, "row": row}, ensure_ascii=False) + "\n" for i, row in items)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done.update(items)

    def finish(self, n: int) -> str | None:
        """Removes the file once the caption file holds the first n queries' rows; keeps it (and
        says why) when it holds captions past them (a rerun with a smaller --limit)."""
        past = sum(i >= n for i in self.done)
        if past:
            return f"kept {self.path}: it holds {past} caption(s) past these {n} queries (--limit)"
        self.path.unlink(missing_ok=True)
        return None
