"""Score a model on the held-out synthetic queries the way RePIC evaluates: greedy captions in
the inference layout with the ground-truth references inserted (skip-retrieval), written as a
RePIC caption file, scored with RePIC's metric (`rlpt_fast.metrics`, the 4-concept script's rules:
every ground-truth slot, lower-cased), plus the demo's check on the non-name words.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rlpt_fast.metrics import score_file
from rlpt_fast.model import QwenVLModel
from rlpt_fast.prompts import PromptBuilder
from rlpt_fast.rollout import Engine, Request, SamplingParams

from .base_model import inference_prompt
from .world import DemoWorld, non_name_accuracy, question

PROTOCOL = "4-concept"  # all slots of a query count; names compared lower-cased


@dataclass(frozen=True)
class EvalResult:
    """precision / recall / f1: RePIC's name metric in percent; non_name_accuracy: mean over
    queries of world.non_name_accuracy, in percent; captions: the caption file written."""
    precision: float
    recall: float
    f1: float
    non_name_accuracy: float
    queries: int
    slots: int
    captions: str

    def summary(self) -> dict:
        return {k: round(v, 2) for k, v in asdict(self).items() if k in ("precision", "recall", "f1")}


def query_requests(builder: PromptBuilder, dw: DemoWorld) -> tuple[list[Request], list[str]]:
    """One request per held-out query (question i of RePIC's cycling list) and the questions."""
    requests, questions = [], []
    for i, q in enumerate(dw.queries):
        p = inference_prompt(builder, dw, list(q.concepts), q.image, i)
        requests.append(Request(p.input_ids, p.pixel_values, p.image_grid_thw))
        questions.append(question(i, len(q.concepts)))
    return requests, questions


def generate_captions(engine: Engine, builder: PromptBuilder, requests: list[Request],
                      params: SamplingParams) -> list[list[str]]:
    """Decoded completions (special tokens dropped), params.n per request."""
    outs = engine.generate(requests, params)
    tok = builder.tokenizer
    return [[tok.decode(c.token_ids, skip_special_tokens=True).strip() for c in cs] for cs in outs]


def write_caption_file(path: Path, dw: DemoWorld, captions: list[str], questions: list[str]) -> Path:
    """RePIC's caption-file rows: [query image, [ground-truth keys], caption, question]."""
    rows = [[str(Path(q.image).relative_to(dw.files.root)), list(q.concepts), c, qu]
            for q, c, qu in zip(dw.queries, captions, questions)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def evaluate(model: QwenVLModel, builder: PromptBuilder, dw: DemoWorld, out: Path,
             max_tokens: int = 64, engine: Engine | None = None) -> EvalResult:
    """Greedy captions for every held-out query -> caption file `out` -> metrics."""
    engine = engine or Engine(model)
    requests, questions = query_requests(builder, dw)
    captions = [cs[0] for cs in generate_captions(
        engine, builder, requests, SamplingParams(temperature=0.0, max_tokens=max_tokens))]
    write_caption_file(out, dw, captions, questions)
    return score_caption_file(out, dw)


def score_caption_file(path: Path, dw: DemoWorld) -> EvalResult:
    """Metrics of a caption file written by `write_caption_file` (re-read from disk, so the
    report states exactly what `rlpt score-captions --protocol 4-concept` prints for it)."""
    s = score_file(path, PROTOCOL)
    rows = json.loads(Path(path).read_text())
    by_image = {str(Path(q.image).relative_to(dw.files.root)): q for q in dw.queries}
    acc = [non_name_accuracy(r[2], dw.world, dw.scene_of(by_image[r[0]])) for r in rows]
    return EvalResult(s.precision, s.recall, s.f1, 100 * sum(acc) / max(1, len(acc)),
                      len(rows), s.slots, str(path))
