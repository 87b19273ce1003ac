"""`rlpt caption`: personalized captions of a query set, RePIC's skip-retrieval evaluation.

For each query the ground-truth concepts' references are inserted directly (database order),
then the query image and a question cycling through RePIC's list, rendered in RePIC's inference
layout (rlpt_fast.prompts.inference_messages); decoding is greedy. The output file is RePIC's
caption format, a JSON list of `[query_image, [gt concept keys], caption, question]`, so

    rlpt caption --model DIR --database database_mod.json --queries Q.json --out caps.json
    rlpt score-captions caps.json --protocol 2-concept

scores it. Query images are written as the query file names them. RePIC ran this with
max_pixels = 1024*28*28 and up to 1024 new tokens (the defaults here).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from rlpt_fast.data import ConceptDatabase, Query, load_database, load_queries, read_json
from rlpt_fast.prompts import INFERENCE_MAX_PIXELS, PromptBuilder, question_for


def query_names(path: str | Path) -> list[str]:
    """The query image strings as the file writes them, one per Query of load_queries (subsets expanded)."""
    data = read_json(path, "query set")
    out = []
    for img, keys in data.items():
        out += [img] * (len(keys) if keys and all(isinstance(k, list) for k in keys) else 1)
    return out


def check_queries(database: ConceptDatabase, queries: list[Query], names: list[str], queries_file: str) -> None:
    """Every query's image exists and its concepts are in the database; else a ValueError listing
    the first few bad queries (raised before the model loads, not at query 900)."""
    errors = []
    for q, name in zip(queries, names):
        unknown = [k for k in q.concepts if k not in database.concepts]
        if unknown:
            errors.append(f"query {name!r}: concept(s) {unknown} not in {database.path}")
        if not q.image.is_file():
            errors.append(f"query {name!r}: image not found: {q.image} (use --image-root)")
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ValueError(f"{queries_file}: {len(errors)} bad query(ies):\n  " + "\n  ".join(errors[:10]) + more)


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def caption_queries(model, builder: PromptBuilder, database: ConceptDatabase, queries: list[Query], *,
                    names: list[str] | None = None, max_new_tokens: int = 1024, multi_questions: bool = False,
                    batch: int = 64, engine=None) -> list[list]:
    """Greedy captions; returns RePIC caption rows [image, [keys], caption, question].
    names: the image strings to write (default: the resolved paths). engine: reuse one (else built)."""
    from rlpt_fast.rollout import Engine, Request, SamplingParams

    rows, pending = [], []
    for i, q in enumerate(queries):
        question = question_for(i, multi_questions)
        prompt = builder.inference_prompt(database.select(list(q.concepts)), q.image, question)
        pending.append((i, q, question, prompt))
    longest = max((p.input_ids.numel() for *_, p in pending), default=1)
    if engine is None:
        engine = Engine(model, max_model_len=max(4096, longest + max_new_tokens))
    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens)
    tok = builder.tokenizer
    for start in range(0, len(pending), batch):
        chunk = pending[start:start + batch]
        outs = engine.generate([Request(p.input_ids, p.pixel_values, p.image_grid_thw) for *_, p in chunk], params)
        for (i, q, question, _), (comp,) in zip(chunk, outs):
            text = tok.decode(comp.token_ids, skip_special_tokens=True).strip()
            rows.append([names[i] if names else str(q.image), list(q.concepts), text, question])
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Qwen-VL checkpoint directory (base or merged)")
    p.add_argument("--adapter", help="optional PEFT LoRA adapter directory (rlpt train's checkpoints/step-*/adapter)")
    p.add_argument("--database", required=True, help="database_mod.json (concept_dict with names, images, info)")
    p.add_argument("--queries", required=True, help="*_query_templates.json: query image -> concept keys")
    p.add_argument("--out", required=True, help="caption file to write (RePIC's JSON format)")
    p.add_argument("--image-root", help="directory query image paths are relative to (default: the query file's)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="RePIC: 1024")
    p.add_argument("--max-pixels", type=int, default=INFERENCE_MAX_PIXELS, help="per image; RePIC: 1024*28*28")
    p.add_argument("--questions", choices=("single", "multi"), default="single",
                   help="which of RePIC's question lists to cycle (their committed files use 'single')")
    p.add_argument("--limit", type=int, default=0, help="caption only the first N queries (0 = all)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    """Exit status 1 with a reason naming the file (and query, concept or image) on bad input."""
    try:
        rows = _caption(args)
    except (ValueError, OSError) as e:  # bad database, queries, model, adapter or image
        print(f"rlpt caption: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    write_atomic(out, json.dumps(rows, indent=1, ensure_ascii=False))
    print(json.dumps({"out": str(out), "captions": len(rows)}))
    return 0


def _caption(args: argparse.Namespace) -> list[list]:
    from safetensors import SafetensorError

    from rlpt_fast.model import load_model
    from rlpt_fast.model.lora_io import load_adapter
    from rlpt_fast.train.runtime import resolve_device, resolve_dtype

    database = load_database(args.database)
    queries = load_queries(args.queries, image_root=args.image_root)
    names = query_names(args.queries)
    if args.limit:
        queries, names = queries[:args.limit], names[:args.limit]
    check_queries(database, queries, names, args.queries)
    device = resolve_device(args.device)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device).eval()
    if args.adapter:
        try:
            load_adapter(model, args.adapter)
        except (KeyError, ValueError, OSError, SafetensorError) as e:  # KeyError, SafetensorError: no file named
            raise ValueError(f"--adapter {args.adapter}: cannot load it: {type(e).__name__}: {e}") from e
    builder = PromptBuilder(args.model, inference_max_pixels=args.max_pixels)
    with torch.no_grad():
        return caption_queries(model, builder, database, queries, names=names, max_new_tokens=args.max_new_tokens,
                               multi_questions=args.questions == "multi")
