"""A synthetic personal-concept world: RePIC's task in miniature, deterministic by seed, no files.

Each concept is a made-up name ("<Kalo>") with a distinct procedural appearance: a shape, a
colour and a texture, drawn with PIL. A reference image shows it alone; scenes show 0-4
concepts plus distractor objects (appearances no concept has, often sharing its shape or colour)
at known boxes, each object in its own cell of a 3x3 grid so boxes never overlap. From these:
training rows for all four reward methods, a concept database and an evaluation query set, in
RePIC's formats (`write_world`), so loaders, prompts, rewards and metrics run on it unchanged.

Keys equal the shown names in brackets (key "<Kalo>", name "Kalo"), so the verbatim name
rewards can fire; RePIC's own 4-concept data does not have that property (keys "<thor>", shown
"Thor"). Images are small (56 px references, 112 px scenes) for CPU training of tiny models.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross", "ring")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180),
           "yellow": (240, 200, 30), "purple": (148, 103, 189), "orange": (255, 127, 14),
           "cyan": (23, 190, 207), "pink": (247, 129, 191), "brown": (140, 86, 75)}
TEXTURES = ("solid", "striped", "dotted", "checkered")
SYLLABLES = ("ka", "lo", "mi", "zu", "ra", "te", "po", "vi", "na", "sho", "ben", "dor", "fi",
             "gu", "yel", "mo", "tar", "wen", "qui", "bex")


@dataclass(frozen=True)
class Look:
    shape: str
    colour: str
    texture: str

    def describe(self) -> str:
        return f"a {self.colour} {self.texture} {self.shape}"


@dataclass(frozen=True)
class SynthConcept:
    key: str   # "<Kalo>"
    name: str  # "Kalo"
    look: Look

    @property
    def info(self) -> str:
        return f"<{self.name}> is {self.look.describe()}."


@dataclass(frozen=True)
class Placed:
    look: Look
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in scene pixels (exclusive x2, y2)
    key: str | None                 # None for a distractor


@dataclass(frozen=True)
class Scene:
    index: int
    background: tuple[int, int, int]
    objects: tuple[Placed, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.objects if o.key is not None)


@dataclass(frozen=True)
class World:
    seed: int
    concepts: tuple[SynthConcept, ...]
    scenes: tuple[Scene, ...]
    ref_size: int
    scene_size: int
    n_train_scenes: int  # scenes[:n] make training rows, the rest the evaluation query set

    def concept(self, key: str) -> SynthConcept:
        return next(c for c in self.concepts if c.key == key)


def make_world(seed: int = 0, n_concepts: int = 8, n_scenes: int = 48, *, ref_size: int = 56,
               scene_size: int = 112, eval_fraction: float = 0.25) -> World:
    """Draw the world's concepts and scene layouts (images are rendered on demand)."""
    if not 1 <= n_concepts <= len(SHAPES) * len(COLOURS):
        raise ValueError(f"n_concepts must be in 1..{len(SHAPES) * len(COLOURS)}, got {n_concepts}")
    if scene_size < 60 or ref_size < 16:
        raise ValueError(f"scene_size >= 60 and ref_size >= 16 needed, "
                         f"got {scene_size}, {ref_size}")
    rng = random.Random(seed)
    looks = _distinct_looks(rng, n_concepts)
    names = _names(rng, n_concepts)
    concepts = tuple(SynthConcept(f"<{n}>", n, lk) for n, lk in zip(names, looks))
    scenes = tuple(_scene(rng, i, concepts, scene_size) for i in range(n_scenes))
    n_train = n_scenes - int(round(n_scenes * eval_fraction))
    return World(seed, concepts, scenes, ref_size, scene_size, n_train)


def more_scenes(world: World, n: int, tag: str = "more") -> tuple[Scene, ...]:
    """n further scenes of the world's cast, each with at least one concept, drawn like the
    world's own (concepts, distractors, boxes) from their own rng (seeded by the world's seed and
    `tag`), so the world's scenes, training rows and query set stay exactly as they were. Indices
    continue after the world's last scene, so scene_path never collides with one of them."""
    if n < 0:
        raise ValueError(f"more_scenes: n must be >= 0, got {n}")
    rng = random.Random(f"{tag}:{world.seed}")
    out: list[Scene] = []
    index = len(world.scenes)
    while len(out) < n:
        sc = _scene(rng, index, world.concepts, world.scene_size)
        index += 1
        if sc.keys:
            out.append(sc)
    return tuple(out)


def _distinct_looks(rng: random.Random, n: int) -> list[Look]:
    # Distinct (shape, colour) pairs, so no two concepts differ by texture alone.
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    rng.shuffle(pairs)
    return [Look(s, c, rng.choice(TEXTURES)) for s, c in pairs[:n]]


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if name not in names:
            names.append(name)
    return names


def _distractor(rng: random.Random, concepts: tuple[SynthConcept, ...]) -> Look:
    taken = {(c.look.shape, c.look.colour) for c in concepts}
    while True:  # share a shape or a colour with a concept, but never both
        base = rng.choice(concepts).look
        if rng.random() < 0.5:
            look = Look(base.shape, rng.choice(list(COLOURS)), rng.choice(TEXTURES))
        else:
            look = Look(rng.choice(SHAPES), base.colour, rng.choice(TEXTURES))
        if (look.shape, look.colour) not in taken:
            return look


def _scene(rng: random.Random, index: int, concepts: tuple[SynthConcept, ...], size: int) -> Scene:
    n_c = rng.choice((0, 1, 1, 2, 2, 3, 4)) if len(concepts) >= 4 else rng.randint(0, len(concepts))
    present = rng.sample(concepts, min(n_c, len(concepts)))
    n_d = rng.randint(0 if n_c else 1, 2)
    cells = rng.sample(range(9), len(present) + n_d)
    cell = size // 3
    objects = []
    for j, k in enumerate(cells):
        side = rng.randint(int(cell * 0.6), cell - 2)
        x = (k % 3) * cell + rng.randint(0, cell - side)
        y = (k // 3) * cell + rng.randint(0, cell - side)
        c = present[j] if j < len(present) else None
        look = c.look if c else _distractor(rng, concepts)
        objects.append(Placed(look, (x, y, x + side, y + side), c.key if c else None))
    bg = tuple(rng.randint(200, 245) for _ in range(3))
    return Scene(index, bg, tuple(objects))


# ---------------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, side: int) -> Image.Image:
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    s, c = side - 1, (side - 1) / 2
    if shape == "circle":
        d.ellipse([0, 0, s, s], fill=255)
    elif shape == "ring":
        d.ellipse([0, 0, s, s], fill=255)
        d.ellipse([s * 0.3, s * 0.3, s * 0.7, s * 0.7], fill=0)
    elif shape == "square":
        d.rectangle([0, 0, s, s], fill=255)
    elif shape == "cross":
        d.rectangle([s * 0.33, 0, s * 0.67, s], fill=255)
        d.rectangle([0, s * 0.33, s, s * 0.67], fill=255)
    else:
        d.polygon(_polygon(shape, c, s), fill=255)
    return m


def _polygon(shape: str, c: float, s: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(c, 0), (s, s), (0, s)]
    if shape == "diamond":
        return [(c, 0), (s, c), (c, s), (0, c)]
    n, radii = (6, (c,)) if shape == "hexagon" else (10, (c, c * 0.45))  # star: 5 points
    return [(c + radii[i % len(radii)] * math.sin(2 * math.pi * i / n),
             c - radii[i % len(radii)] * math.cos(2 * math.pi * i / n)) for i in range(n)]


def _texture(look: Look, side: int) -> Image.Image:
    rgb = COLOURS[look.colour]
    dark = tuple(v // 3 for v in rgb)
    t = Image.new("RGB", (side, side), rgb)
    d = ImageDraw.Draw(t)
    step = max(4, side // 5)
    if look.texture == "striped":
        for x in range(-side, side, step):
            d.line([(x, side), (x + side, 0)], fill=dark, width=max(1, step // 3))
    elif look.texture == "dotted":
        r = max(1, step // 4)
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    elif look.texture == "checkered":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    return t


def _paint(canvas: Image.Image, look: Look, box: tuple[int, int, int, int]) -> None:
    side = box[2] - box[0]
    canvas.paste(_texture(look, side), box[:2], _shape_mask(look.shape, side))


def reference_image(world: World, key: str) -> Image.Image:
    s = world.ref_size
    im = Image.new("RGB", (s, s), (235, 235, 235))
    pad = s // 8
    _paint(im, world.concept(key).look, (pad, pad, s - pad, s - pad))
    return im


def scene_image(world: World, scene: Scene) -> Image.Image:
    im = Image.new("RGB", (world.scene_size, world.scene_size), scene.background)
    for o in scene.objects:
        _paint(im, o.look, o.box)
    return im


# ------------------------------------------------------------------------- RePIC-format output
def ref_path(c: SynthConcept) -> str:
    return f"refs/{c.name.lower()}.png"


def scene_path(scene: Scene) -> str:
    return f"scenes/scene_{scene.index:03d}.png"


def _refs_problem(concepts: list[SynthConcept], ask: str) -> str:
    lines = [f"{i}. Name: <{c.name}>, Info: {c.info}" for i, c in enumerate(concepts, start=1)]
    return "\n".join(lines + [ask])


def training_rows(world: World) -> list[dict]:
    """Rows for all four methods from the training scenes; image paths relative to the world
    directory (references first, scene last; a lone string for the box task)."""
    rng = random.Random(f"rows:{world.seed}")
    rows = []
    for sc in world.scenes[:world.n_train_scenes]:
        present = [world.concept(k) for k in sc.keys]
        absent = [c for c in world.concepts if c.key not in sc.keys]
        asks = [(c, "yes") for c in rng.sample(present, min(1, len(present)))]
        asks += [(c, "no") for c in rng.sample(absent, min(1, len(absent)))]
        for c, answer in asks:
            rows.append(_row([ref_path(c), scene_path(sc)], _refs_problem(
                [c], f"Is <{c.name}> in the last image?"), answer, "yes_no"))
        if present:
            c = rng.choice(present)
            rows.append(_row([ref_path(c), scene_path(sc)], _refs_problem(
                [c], "Give a personalized caption of the last image."), c.key, "yes_no_name"))
            rows.append(_row(scene_path(sc), f"<{c.name}> is {c.look.describe()}. Where is "
                             f"<{c.name}> in the image? Give its bounding box.",
                             list(sc.objects[sc.keys.index(c.key)].box), "iou"))
        if len(present) >= 2:
            refs = [c for c in world.concepts if c.key in sc.keys]
            rows.append(_row([ref_path(c) for c in refs] + [scene_path(sc)], _refs_problem(
                refs, "Give a personalized caption of the last image."),
                [c.key for c in refs], "yes_no_name_multi"))
    return rows


def _row(image, problem: str, solution, method: str) -> dict:
    return {"image": image, "problem": problem, "solution": solution, "accu_reward_method": method}


def database(world: World) -> dict:
    """database_mod.json content (RAP/RePIC format), image paths relative to the world dir."""
    cdict = {c.key: {"name": c.name, "image": ref_path(c), "info": c.info,
                     "category": c.look.shape} for c in world.concepts}
    return {"concept_dict": cdict, "path_to_concept": {ref_path(c): c.key for c in world.concepts}}


def query_templates(world: World) -> dict[str, list[str]]:
    """Evaluation query set: held-out scenes with at least one concept -> their keys."""
    return {scene_path(sc): list(sc.keys) for sc in world.scenes[world.n_train_scenes:] if sc.keys}


def caption_for(world: World, scene: Scene) -> str:
    """A correct personalized caption (names every concept; over 100 characters)."""
    parts = [f"<{world.concept(k).name}>, {world.concept(k).look.describe()}," for k in scene.keys]
    n_other = sum(1 for o in scene.objects if o.key is None)
    body = " and ".join(parts) if parts else "no familiar object"
    return (f"In this picture we can see {body} placed on a plain light background, together "
            f"with {n_other} other unfamiliar object(s) nearby.")


@dataclass(frozen=True)
class WorldFiles:
    root: Path
    rows: Path       # train.jsonl
    database: Path   # database_mod.json
    queries: Path    # synthetic_query_templates.json


def write_scene_images(world: World, scenes, root: str | Path) -> None:
    """PNG of each scene at root / scene_path(scene) (deterministic bytes)."""
    (Path(root) / "scenes").mkdir(parents=True, exist_ok=True)
    for sc in scenes:
        scene_image(world, sc).save(Path(root) / scene_path(sc))


def write_world(world: World, out_dir: str | Path) -> WorldFiles:
    """Write images, rows, database and query set under out_dir (PNG, deterministic bytes)."""
    root = Path(out_dir)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for c in world.concepts:
        reference_image(world, c.key).save(root / ref_path(c))
    write_scene_images(world, world.scenes, root)
    files = WorldFiles(root, root / "train.jsonl", root / "database_mod.json",
                       root / "synthetic_query_templates.json")
    files.rows.write_text("".join(json.dumps(r) + "\n" for r in training_rows(world)))
    files.database.write_text(json.dumps(database(world), indent=2))
    files.queries.write_text(json.dumps(query_templates(world), indent=2))
    return files
