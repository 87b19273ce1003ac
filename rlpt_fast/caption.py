"""`rlpt caption`: personalized captions of a query set, RePIC's skip-retrieval evaluation.

For each query the ground-truth concepts' references are inserted directly (database order),
then the query image and a question cycling through RePIC's list, rendered in RePIC's inference
layout (rlpt_fast.prompts.inference_messages); decoding is greedy. The output file is RePIC's
caption format, a JSON list of `[query_image, [gt concept keys], caption, question]`, so

    rlpt caption --model DIR --database database_mod.json --queries Q.json --out caps.json
    rlpt score-captions caps.json --protocol 2-concept

scores it. Query images are written as the query file names them. RePIC ran this with
max_pixels = 1024*28*28 and up to 1024 new tokens (the defaults here).

Nothing done is lost when a run stops part way (out of memory, a kill): queries go to the engine
--chunk-size at a time and each finished chunk is appended to OUT.partial.jsonl; the same command
run again generates only the rest (caption_partial.py). The caption file is written at the end,
atomically, and the partial file removed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rlpt_fast.caption_partial import PartialCaptions, dir_stamp, file_digest, partial_path, write_atomic
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


def caption_queries(model, builder: PromptBuilder, database: ConceptDatabase, queries: list[Query], *,
                    names: list[str] | None = None, max_new_tokens: int = 1024, multi_questions: bool = False,
                    chunk_size: int = 64, engine=None, done: dict[int, list] | None = None,
                    on_chunk=None) -> list[list]:
    """Greedy captions; returns RePIC caption rows [image, [keys], caption, question] in query order.
    names: the image strings to write (default: the resolved paths). engine: reuse one (else built).
    Queries go to the engine chunk_size at a time; done: rows by query index already captioned (a
    resumed run: not generated again); on_chunk([(index, row), ...]) gets each finished chunk."""
    from rlpt_fast.rollout import Engine, SamplingParams

    done = dict(done or {})
    questions = [question_for(i, multi_questions) for i in range(len(queries))]

    def prompt(i: int):
        return builder.inference_prompt(database.select(list(queries[i].concepts)), queries[i].image, questions[i])

    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens)
    for start in range(0, len(queries), chunk_size):
        todo = [i for i in range(start, min(start + chunk_size, len(queries))) if i not in done]
        if not todo:
            continue
        if engine is None:
            # max_model_len (hence the kernels' splits) from every prompt, done ones too, so a resumed
            # run decodes exactly as an uninterrupted one. Prompts are built again per chunk and
            # dropped after it: a query set's pixels at once would be tens of GB at RePIC's size.
            longest = max(prompt(j).input_ids.numel() for j in range(len(queries)))
            engine = Engine(model, max_model_len=max(4096, longest + max_new_tokens))
        texts = _generate(engine, builder.tokenizer, [prompt(i) for i in todo], params)
        items = [(i, [names[i] if names else str(queries[i].image), list(queries[i].concepts), text, questions[i]])
                 for i, text in zip(todo, texts)]
        if on_chunk is not None:
            on_chunk(items)
        done.update(items)
    return [done[i] for i in range(len(queries))]


def _generate(engine, tokenizer, prompts: list, params) -> list[str]:
    from rlpt_fast.rollout import Request

    outs = engine.generate([Request(p.input_ids, p.pixel_values, p.image_grid_thw) for p in prompts], params)
    return [tokenizer.decode(comp.token_ids, skip_special_tokens=True).strip() for (comp,) in outs]


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


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
    p.add_argument("--chunk-size", type=positive_int, default=64,
                   help="queries per engine call; each finished chunk is kept in OUT.partial.jsonl, so a "
                        "stopped run rerun with the same command loses nothing")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    """Exit status 1 with a reason naming the file (and query, concept or image) on bad input."""
    partial = PartialCaptions(partial_path(args.out))
    try:
        rows = _caption(args, partial)
    except (ValueError, OSError) as e:  # bad database, queries, model, adapter, image or partial file
        print(f"rlpt caption: {e}", file=sys.stderr)
        _say_kept(partial)
        return 1
    except BaseException:  # out of memory, Ctrl-C, a bug: the traceback follows
        _say_kept(partial)
        raise
    out = Path(args.out)
    write_atomic(out, json.dumps(rows, indent=1, ensure_ascii=False))
    if (note := partial.finish(len(rows))) is not None:
        print(f"rlpt caption: {note}", file=sys.stderr)
    print(json.dumps({"out": str(out), "captions": len(rows)}))
    return 0


def _say_kept(partial: PartialCaptions) -> None:
    if partial.done:
        print(f"rlpt caption: stopped; the {len(partial.done)} captions done are kept in {partial.path}: "
              "run the same command again to caption the rest", file=sys.stderr)


def run_identity(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """What decides the captions, for the partial file's header. Not --limit (query i's caption
    does not depend on it) nor --chunk-size or --device (a rerun after out of memory may change them)."""
    resolved = {k: str(Path(v).resolve()) if v else None
                for k, v in (("model", args.model), ("adapter", args.adapter), ("image_root", args.image_root))}
    return {**resolved, "model_files": dir_stamp(args.model), "adapter_files": dir_stamp(args.adapter),
            "database": file_digest(args.database), "queries": file_digest(args.queries),
            "max_new_tokens": args.max_new_tokens, "max_pixels": args.max_pixels, "questions": args.questions,
            "dtype": str(dtype)}


def _inputs(args: argparse.Namespace) -> tuple[ConceptDatabase, list[Query], list[str]]:
    database = load_database(args.database)
    queries = load_queries(args.queries, image_root=args.image_root)
    names = query_names(args.queries)
    if args.limit:
        queries, names = queries[:args.limit], names[:args.limit]
    check_queries(database, queries, names, args.queries)
    return database, queries, names


def _caption(args: argparse.Namespace, partial: PartialCaptions) -> list[list]:
    from rlpt_fast.train.runtime import resolve_device, resolve_dtype

    database, queries, names = _inputs(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    done = {i: row for i, row in partial.load(run_identity(args, dtype)).items() if i < len(queries)}
    if done:  # (checked, like every input, before the model loads)
        print(f"rlpt caption: {len(done)} of {len(queries)} captions read from {partial.path}; "
              "generating the rest", file=sys.stderr)
    if len(done) == len(queries):
        return [done[i] for i in range(len(queries))]
    model = _load_model(args, device, dtype)
    builder = PromptBuilder(args.model, inference_max_pixels=args.max_pixels)
    with torch.no_grad():
        return caption_queries(model, builder, database, queries, names=names, max_new_tokens=args.max_new_tokens,
                               multi_questions=args.questions == "multi", chunk_size=args.chunk_size,
                               done=done, on_chunk=partial.append)


def _load_model(args: argparse.Namespace, device, dtype):
    from safetensors import SafetensorError

    from rlpt_fast.model import load_model
    from rlpt_fast.model.lora_io import load_adapter

    model = load_model(args.model, dtype=dtype, device=device).eval()
    if args.adapter:
        try:
            load_adapter(model, args.adapter)
        except (KeyError, ValueError, OSError, SafetensorError) as e:  # KeyError, SafetensorError: no file named
            raise ValueError(f"--adapter {args.adapter}: cannot load it: {type(e).__name__}: {e}") from e
    return model
