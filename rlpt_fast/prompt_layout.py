"""Which of RePIC's two prompt layouts a training row is rendered in (the trainer's
``data.prompt_layout``), and the inference layout rebuilt from the row alone.

"training" (RePIC's run): `PromptBuilder.training_prompt` -- all images first, then ``problem`` +
the task suffix.

"inference": `PromptBuilder.inference_prompt` -- system prompt, each reference image followed by
its "i. Name: <name>, Info: ..." line, the query image, then "This is the query image. <question>",
the layout RePIC evaluates in (and a small model that does not transfer between layouts must be
trained in). Everything comes from the row: its ``problem`` carries one such line per reference
(RePIC's retriever lines, numbered 1, 2, ... in order; other lines, the row's own question, are
dropped) and its images are the references in that order, then the query. The question is drawn
from the row's seeded generator over RePIC's cycling list (`prompts.question_for`: the
multi-concept list when there are several references). It is a captioning prompt, so only the
name tasks (yes_no_name, yes_no_name_multi) can be rendered this way.
"""
from __future__ import annotations

import random
import re

from rlpt_fast.data import Concept, DataError, Row, RowError
from rlpt_fast.prompts import ImageError, Prompt, PromptBuilder, question_for

PROMPT_LAYOUTS = ("training", "inference")
CAPTION_TASKS = ("yes_no_name", "yes_no_name_multi")
# lcm of the two question lists' lengths (4 and 3): every question of either list equally likely
QUESTION_DRAWS = 12
_REFERENCE = re.compile(r"(\d+)\. Name: <(.+?)>, Info: (.*)")
_LOOKS_LIKE_REFERENCE = re.compile(r"\s*\d+\s*\.\s*Name\b", re.IGNORECASE)


class RowLayoutError(ValueError):
    """One row that the inference layout cannot render; the message says why."""


def reference_concepts(row: Row) -> list[Concept]:
    """The row's references as concepts (name and info from its "i. Name: <name>, Info: ..."
    lines, image from its images in the same order; key "<name>", no category).

    Raises RowLayoutError when a line that starts like a reference line is malformed, the lines
    are not numbered 1, 2, ... in order, or their number differs from the row's reference images
    (all images but the last)."""
    found: list[tuple[str, str]] = []
    for n, line in enumerate(row.problem.splitlines(), start=1):
        m = _REFERENCE.fullmatch(line)
        if m is None:
            if _LOOKS_LIKE_REFERENCE.match(line):
                raise RowLayoutError(f"problem line {n}: expected 'i. Name: <name>, Info: ...', got {line!r}")
            continue
        if int(m[1]) != len(found) + 1:
            raise RowLayoutError(f"problem line {n}: reference {m[1]} where {len(found) + 1} was expected "
                                 "(references are numbered 1, 2, ... in order)")
        found.append((m[2], m[3]))
    refs = row.images[:-1]
    if not found:
        raise RowLayoutError("no reference line ('i. Name: <name>, Info: ...') in the problem")
    if len(found) != len(refs):
        raise RowLayoutError(f"{len(found)} reference line(s) ('i. Name: ...') for {len(refs)} reference "
                             f"image(s) (the row's images but the last, the query)")
    return [Concept(f"<{name}>", name, path, info, "") for (name, info), path in zip(found, refs)]


def row_question(rng: random.Random, n_concepts: int) -> str:
    """One draw from `rng`: a question of RePIC's cycling list (multi-concept list if n > 1)."""
    return question_for(rng.randrange(QUESTION_DRAWS), n_concepts > 1)


def row_prompt(builder: PromptBuilder, row: Row, rng: random.Random, layout: str = "training") -> Prompt:
    """The row's prompt in `layout` ("training" | "inference", module docstring); rng is the row's
    seeded generator (`prompts.row_rng`). An image that fails to decode raises ImageError naming
    the row and the image."""
    if layout not in PROMPT_LAYOUTS:
        raise ValueError(f"prompt layout must be one of {PROMPT_LAYOUTS}, got {layout!r}")
    try:
        if layout == "training":
            return builder.training_prompt(row, rng)
        try:
            concepts = reference_concepts(row)
        except RowLayoutError as e:
            raise RowLayoutError(f"{row.source or 'row'}: {e}") from None
        return builder.inference_prompt(concepts, row.images[-1], row_question(rng, len(concepts)))
    except ImageError as e:
        raise ImageError(f"{row.source or 'row'}: {e}") from e


def check_rows(rows: list[Row], layout: str, *, tasks: set[str] | None = None,
               skip_invalid: bool = False) -> list[Row]:
    """Rows that `layout` can render, checked before anything trains. tasks: the reward methods
    that will be sampled (None: all). "inference": a sampled row of another task than the name
    tasks is a ValueError (it has no captioning prompt); rows whose reference lines are malformed
    raise DataError listing each (file, row, reason), or are dropped with skip_invalid."""
    if layout not in PROMPT_LAYOUTS:
        raise ValueError(f"prompt layout must be one of {PROMPT_LAYOUTS}, got {layout!r}")
    if layout == "training":
        return rows
    used = [r for r in rows if tasks is None or r.method in tasks]
    other = sorted({r.method for r in used} - set(CAPTION_TASKS))
    if other:
        first = next(r for r in used if r.method in other)
        raise ValueError(f"data.prompt_layout='inference' renders RePIC's captioning prompt, for the name tasks "
                         f"{CAPTION_TASKS} only; the rows include task(s) {other} (first: "
                         f"{first.source or 'a given row'}). Give them weight 0 in data.task_mix, or "
                         "use data.prompt_layout='training'")
    keep, errors = [], []
    for i, r in enumerate(rows):
        try:
            if tasks is None or r.method in tasks:
                reference_concepts(r)
            keep.append(r)
        except RowLayoutError as e:
            file, _, where = (r.source or f"rows:row {i}").rpartition(":")
            errors.append(RowError(file, where, f"data.prompt_layout='inference': {e}"))
    if errors and not skip_invalid:
        raise DataError(errors)
    return keep
