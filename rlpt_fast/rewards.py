"""Verifiable rewards of the RePIC recipe: one reward per sample, chosen by `accu_reward_method`.

Two flavours, picked by `compat`:

* ``"repic"`` reproduces RePIC's reward code (grpo_multitask_multi_img_no_format.py) exactly,
  quirks included: yes/no is the first ``(yes|no)`` anywhere in the lower-cased text ("know"
  reads as "no", "eyes" as "yes"); names are matched verbatim and case-sensitively; outputs
  shorter than 100 characters score 0 on the name tasks; the single-name task scores 0 if the
  closing form ``</Anya>`` also occurs; the box is the first ``[int, int, int, int]`` of
  non-negative integers, taken as is (no rescaling from the model's input frame), and scored 1
  if their IoU (inclusive-pixel intersection) is >= 0.5.
* ``"strict"`` (default) fixes what is wrong there: yes/no as whole words; boxes also read from
  Qwen's ``{"bbox_2d": [...]}`` JSON, with floats and negative numbers; the predicted box mapped
  from the model-input frame back to the original image (``scale``) before a plain continuous
  IoU; optionally the IoU itself as the reward (``continuous_iou=True``). Name tasks are as RePIC.

Any completion text gives a float in [0, 1] and never raises. A solution of the wrong type for
its method is a data error and raises `SolutionError` naming the row.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

METHODS = ("yes_no", "yes_no_name", "yes_no_name_multi", "iou")
COMPATS = ("strict", "repic")
MIN_CONTENT_LEN = 100  # RePIC: shorter outputs earn nothing on the name tasks
IOU_THRESHOLD = 0.5

_REPIC_YES_NO = re.compile(r"(yes|no)", re.IGNORECASE)
_WORD_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_REPIC_BOX = re.compile(r"\[(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\]")
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_STRICT_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_BBOX_2D = re.compile(r"[\"']bbox_2d[\"']\s*:\s*\[" + ",".join([_NUM] * 4) + r"\]")


class SolutionError(ValueError):
    """A row's solution does not have the type its reward method needs."""


def solution_problem(method: str, solution: object) -> str | None:
    """Why `solution` is unusable for `method`, or None if it is fine.

    yes_no: "yes" or "no" (any case, surrounding spaces and a final period allowed);
    yes_no_name: a non-empty string such as "<Anya>"; yes_no_name_multi: a non-empty list of
    non-empty strings (a single string is accepted, as RePIC wraps it); iou: a list of 4 finite
    numbers [x1, y1, x2, y2] in original-image pixels with x1 <= x2 and y1 <= y2.
    """
    if method not in METHODS:
        return f"unknown accu_reward_method {method!r} (expected one of {', '.join(METHODS)})"
    if method == "yes_no":
        ok = isinstance(solution, str) and solution.strip().rstrip(".").lower() in ("yes", "no")
        return None if ok else f"yes_no solution must be 'yes' or 'no', got {solution!r}"
    if method == "yes_no_name":
        ok = isinstance(solution, str) and solution != ""
        return None if ok else f"yes_no_name solution must be a non-empty string, got {solution!r}"
    if method == "yes_no_name_multi":
        names = [solution] if isinstance(solution, str) else solution
        ok = isinstance(names, (list, tuple)) and len(names) > 0
        ok = ok and all(isinstance(n, str) and n != "" for n in names)
        return None if ok else (
            f"yes_no_name_multi solution must be a non-empty list of names, got {solution!r}")
    return _box_problem(solution)


def _box_problem(box: object) -> str | None:
    if not isinstance(box, (list, tuple)):
        return f"iou solution must be a list [x1, y1, x2, y2], got {type(box).__name__} {box!r}"
    if len(box) != 4:
        return f"iou solution must have 4 numbers [x1, y1, x2, y2], got {len(box)}: {list(box)!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in box):
        return f"iou solution must hold 4 finite numbers, got {list(box)!r}"
    if box[2] < box[0] or box[3] < box[1]:
        return f"iou solution needs x1 <= x2 and y1 <= y2, got {list(box)!r}"
    return None


def score(method: str, completion: str, solution: object, *, compat: str = "strict",
          row: object = None, scale: float | Sequence[float] | None = None,
          continuous_iou: bool = False) -> float:
    """Reward in [0, 1] for one completion.

    method: one of METHODS. completion: the decoded model output (non-strings score 0).
    solution: see `solution_problem`. compat: "strict" | "repic" (module docstring).
    row: identifies the data row in error messages (file:line, an index, ...).
    scale: model-input pixels per original pixel, one float or (sx, sy) as returned by the
        image preprocessing; strict mode divides the predicted box by it. Ignored by "repic".
    continuous_iou: strict mode only; return the IoU itself instead of IoU >= 0.5.
    """
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    problem = solution_problem(method, solution)
    if problem is not None:
        where = f"row {row}: " if row is not None else ""
        raise SolutionError(where + problem)
    if not isinstance(completion, str):
        return 0.0
    if method == "yes_no":
        return _yes_no(completion, solution, compat)
    if method == "yes_no_name":
        return _name(completion, solution)
    if method == "yes_no_name_multi":
        return _names(completion, [solution] if isinstance(solution, str) else list(solution))
    if compat == "repic":
        return _repic_box_reward(completion, solution)
    return _strict_box_reward(completion, solution, _scale_xy(scale, row), continuous_iou)


def _yes_no(text: str, solution: str, compat: str) -> float:
    pattern = _REPIC_YES_NO if compat == "repic" else _WORD_YES_NO
    gt = pattern.search(solution.lower())
    out = pattern.search(text.lower())
    return 1.0 if gt and out and gt.group(1) == out.group(1) else 0.0


def _name(text: str, name: str) -> float:
    if len(text) < MIN_CONTENT_LEN or name not in text:
        return 0.0
    # Anti-hacking: emitting "</Anya>" alongside "<Anya>" (tag spamming) earns nothing.
    if name.startswith("<") and name.replace("<", "</") in text:
        return 0.0
    return 1.0


def _names(text: str, names: list[str]) -> float:
    if len(text) < MIN_CONTENT_LEN:
        return 0.0
    return sum(1 for n in names if n in text) / len(names)


def _repic_box_reward(text: str, gt: Sequence[float]) -> float:
    m = _REPIC_BOX.search(text)
    if not m:
        return 0.0
    pred = [int(m.group(i)) for i in range(1, 5)]
    inter, union = _repic_inter_union(pred, gt)
    # inter / union >= 0.5 without float division: exact, and no overflow on huge integers.
    return 1.0 if 2 * inter >= union else 0.0


def _repic_inter_union(p: Sequence[float], g: Sequence[float]) -> tuple[float, float]:
    """RePIC's _iou: inclusive-pixel intersection, exclusive areas, union at least 1."""
    ix1, iy1 = max(p[0], g[0]), max(p[1], g[1])
    ix2, iy2 = min(p[2] - 1, g[2] - 1), min(p[3] - 1, g[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    area_p = max(0, p[2] - p[0]) * max(0, p[3] - p[1])
    area_g = max(0, g[2] - g[0]) * max(0, g[3] - g[1])
    return inter, max(1, area_p + area_g - inter)


def repic_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """RePIC's IoU value (quirks included), for reports and tests."""
    inter, union = _repic_inter_union(pred, gt)
    return float(inter) / float(union)


def parse_box(text: str) -> list[float] | None:
    """Strict box parsing: the first {"bbox_2d": [...]} if any, else the first 4-number list."""
    m = _BBOX_2D.search(text) or _STRICT_BOX.search(text)
    if not m:
        return None
    box = [float(m.group(i)) for i in range(1, 5)]
    return box if all(math.isfinite(v) for v in box) else None


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Plain continuous IoU of boxes [x1, y1, x2, y2] (corners, not pixel counts)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) \
        + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    if not union > 0 or not math.isfinite(union):
        return 0.0
    return min(1.0, max(0.0, inter / union))


def _scale_xy(scale: float | Sequence[float] | None, row: object) -> tuple[float, float]:
    if scale is None:
        return 1.0, 1.0
    sx, sy = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"row {row}: scale must be positive and finite, got {scale!r}")
    return float(sx), float(sy)


def _strict_box_reward(text: str, gt: Sequence[float], scale: tuple[float, float],
                       continuous: bool) -> float:
    box = parse_box(text)
    if box is None:
        return 0.0
    sx, sy = scale
    pred = [box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy]  # model-input -> original pixels
    value = iou(pred, [float(v) for v in gt])
    if continuous:
        return value
    return 1.0 if value >= IOU_THRESHOLD else 0.0
