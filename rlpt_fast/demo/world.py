"""The demo's data: one user's fixed cast of named concepts, captions and evaluation queries.

Built on `rlpt_fast.synthetic` (concepts, reference images, scenes at known boxes, written in
RePIC's formats). What this module adds is the demo's caption language:

    generic:      "In this picture we can see a red striped circle and a blue solid star placed
                   together on a plain light background, in a simple scene."
    personalized: "In this picture we can see a red striped circle, <Kalo>, and a blue solid
                   star, <Mizu>, placed together on a plain light background, in a simple scene."

A caption describes the concepts shown as references, in reference order (database order, as
RePIC's skip-retrieval inserts them). A name follows its look as an apposition, so taking the
names out leaves exactly the generic caption's words, and the choice to name is one token
("," instead of " and" / " placed"). Measured at the default seed (full demo, personal rate
0.25): look-first reached F1 91.8 after GRPO against 75.8 for name-first ("<Kalo>, a red ..."),
and lost less non-name accuracy. The captions do not count the distractors: with the frozen
random vision tower a count is guesswork, and GRPO shifts guesses it does not reward, which
made the non-name check measure noise.

Every caption is at least 100 characters long (the shortest look, "a red solid ring", gives
108), so RePIC's 100-character minimum of the name rewards is met by any well-formed caption
and is kept as is.
"""
from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from pathlib import Path

from rlpt_fast.data import ConceptDatabase, Query, load_database, load_queries
from rlpt_fast.prompts import SINGLE_QUESTIONS, MULTI_QUESTIONS, SYSTEM_PROMPT, question_for
from rlpt_fast.synthetic import (COLOURS, SHAPES, TEXTURES, Scene, World, WorldFiles, make_world,
                                 more_scenes, scene_path, write_scene_images, write_world)

CAPTION_HEAD = "In this picture we can see "
CAPTION_TAIL = " placed together on a plain light background, in a simple scene."
NAME_FIRST = False  # see the module docstring
PUNCT = '.,!?;:()[]{}"\'-'


@dataclass(frozen=True)
class DemoWorld:
    """The world, its files on disk, and the scenes split into training and evaluation.

    train_scenes / eval_scenes: scenes with at least one concept (a personalized caption needs
    one); queries: the evaluation query set as `rlpt_fast.data` loads it (one per eval scene);
    pretrain_scenes: further scenes of the same cast that only the warm start sees (a base
    model's broader pretraining; not in the RL rows, never held-out scenes).
    """
    world: World
    files: WorldFiles
    database: ConceptDatabase
    train_scenes: tuple[Scene, ...]
    eval_scenes: tuple[Scene, ...]
    queries: tuple[Query, ...]
    pretrain_scenes: tuple[Scene, ...] = ()

    @property
    def warm_start_scenes(self) -> tuple[Scene, ...]:
        return self.train_scenes + self.pretrain_scenes

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.world.concepts]

    def scene_of(self, query: Query) -> Scene:
        by_path = {scene_path(s): s for s in self.eval_scenes}
        return by_path[Path(query.image).relative_to(self.files.root).as_posix()]


def build_world(out_dir: str | Path, seed: int = 0, n_concepts: int = 8,
                n_scenes: int = 240, eval_fraction: float = 0.2,
                n_pretrain_scenes: int = 0) -> DemoWorld:
    """Draw the world for `seed`, write it under out_dir and load it back through the recipe's
    loaders (so the demo reads exactly what a user's RePIC-format data would give).
    n_pretrain_scenes further scenes (synthetic.more_scenes) are drawn and written for the warm
    start; they change nothing else."""
    world = make_world(seed, n_concepts, n_scenes, eval_fraction=eval_fraction)
    files = write_world(world, out_dir)
    pretrain = more_scenes(world, n_pretrain_scenes, tag="pretrain")
    write_scene_images(world, pretrain, files.root)
    database = load_database(files.database)
    queries = tuple(load_queries(files.queries))
    train = tuple(s for s in world.scenes[:world.n_train_scenes] if s.keys)
    evals = tuple(s for s in world.scenes[world.n_train_scenes:] if s.keys)
    if len(queries) != len(evals):
        raise AssertionError(f"{files.queries}: {len(queries)} queries for {len(evals)} scenes")
    return DemoWorld(world, files, database, train, evals, queries, pretrain)


def scene_keys(world: World, scene: Scene) -> list[str]:
    """The scene's concept keys in database order (the order references are shown in)."""
    return [c.key for c in world.concepts if c.key in scene.keys]


def caption(world: World, scene: Scene, personalized: bool) -> str:
    """The ground-truth caption of a scene (module docstring), with or without names."""
    keys = scene_keys(world, scene)
    looks = [world.concept(k).look.describe() for k in keys]
    if personalized and NAME_FIRST:  # "<Kalo>, a red solid ring,"
        looks = [f"{k}, {lk}," for k, lk in zip(keys, looks)]
    elif personalized:  # "a red solid ring, <Kalo>,"
        looks = [f"{lk}, {k}," for k, lk in zip(keys, looks)]
    return f"{CAPTION_HEAD}{' and '.join(looks)}{CAPTION_TAIL}"


def warm_start_captions(world: World, scenes: tuple[Scene, ...], personal_rate: float,
                        epochs: int, seed: int) -> list[tuple[Scene, str, int]]:
    """(scene, caption, question index) for `epochs` shuffled passes over the scenes; each
    caption is personalized with probability personal_rate (seeded), like the occasional
    name in a base model's captions. A scene keeps one question (its index in RePIC's cycling
    list), so each scene's prompt is rendered once for the whole warm start."""
    rng = random.Random(f"warm-start:{seed}")
    out = []
    for _ in range(epochs):
        order = list(scenes)
        rng.shuffle(order)
        for sc in order:
            personal = rng.random() < personal_rate
            out.append((sc, caption(world, sc, personal), sc.index))
    return out


def corpus(world: World) -> list[str]:
    """Sentences for the tokenizer's BPE: the prompt and caption words get short encodings."""
    lines = [SYSTEM_PROMPT, *SINGLE_QUESTIONS, *MULTI_QUESTIONS, "This is the query image."]
    for i, c in enumerate(world.concepts, start=1):
        lines.append(f"{i}. Name: <{c.name}>, Info: {c.info}")
    lines += [caption(world, s, p) for s in world.scenes if s.keys for p in (False, True)]
    lines += [f"a {c} {t} {s}" for c in COLOURS for t in TEXTURES for s in SHAPES]
    return lines * 3  # outweigh the fixture's built-in English corpus


def question(index: int, n_concepts: int) -> str:
    return question_for(index, n_concepts > 1)


# ----------------------------------------------------------------------------- non-name words
def content_words(text: str, names: list[str]) -> list[str]:
    """Lower-cased words with boundary punctuation and every concept name (bare or in <>)
    removed: what is left of a caption once the names are taken out."""
    drop = {n.lower() for n in names} | {f"<{n.lower()}>" for n in names}
    words = (w.strip(PUNCT).lower() for w in text.replace("</s>", "").split())
    return [w for w in words if w and w not in drop]


def non_name_accuracy(text: str, world: World, scene: Scene) -> float:
    """Agreement in [0, 1] of a caption's non-name words with the scene's ground truth:
    difflib's ratio 2*M/(len(a)+len(b)) of the two word sequences (M = matched words), so a
    wrong colour, a dropped or repeated object or an extra word all cost."""
    names = [c.name for c in world.concepts]
    truth = content_words(caption(world, scene, personalized=False), names)
    return difflib.SequenceMatcher(None, truth, content_words(text, names), autojunk=False).ratio()
