"""The embedded synthetic visual task behind the quickstart.

Each image holds one or two coloured shapes in a left and a right slot; each prompt asks one of
four questions about it (colour, count, position, describe). Every rubric criterion carries a
regex ``check`` so ``RuleJudge`` can score answers without a model, and every rubric has
pitfall criteria ("does not name an absent colour"), so an answer that lists every word it knows
cannot score well. Records are plain dicts holding exactly the DESIGN.md pool keys (the pool
loader rejects others), so ``flawed_answers`` reads its facts back from the instruction, the
reference and the pitfall checks, and ``scene_from_image`` recovers a scene from its picture.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
KINDS = ("color", "count", "position", "describe")
FLAW_KINDS = ("hallucinate", "wrong", "terse", "ramble")
RGB = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
WIDTH, HEIGHT, SLOT = 112, 56, 56
TOTAL_PAIRS = 528  # distinct (scene, instruction) pairs of the task
FILLERS = ("It is a nice picture.", "I hope this helps.", "Let me know if you need more.")
ABSENT_COLOR = "Does not name a colour that is absent from the image."
ABSENT_SHAPE = "Does not name a shape that is absent from the image."


@dataclass(frozen=True)
class Scene:
    """Contents of the two slots: ``(color, shape)`` or ``None`` for an empty slot."""

    left: tuple[str, str] | None
    right: tuple[str, str] | None

    def items(self) -> list[tuple[str, tuple[str, str]]]:
        """The filled slots as ``(side, (color, shape))``, left first."""
        return [(side, obj) for side, obj in (("left", self.left), ("right", self.right)) if obj]


@dataclass(frozen=True)
class ToyPools:
    """Paths of the two pools written by ``write_pools`` (images live in their ``images/``)."""

    train: Path
    heldout: Path
    warmstart: Path


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw ``scene`` as a 112x56 RGB image; ``seed`` sets each shape's size and jitter."""
    rng = random.Random(seed)
    img = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for x0, obj in ((0, scene.left), (SLOT, scene.right)):
        # Draw the numbers for empty slots too, so one slot's jitter never depends on the other.
        size, dx, dy = rng.randint(34, 42), rng.randint(-3, 3), rng.randint(-3, 3)
        if obj is None:
            continue
        color, shape = obj
        left, top = x0 + SLOT // 2 + dx - size // 2, HEIGHT // 2 + dy - size // 2
        box = (left, top, left + size - 1, top + size - 1)
        if shape == "circle":
            draw.ellipse(box, fill=RGB[color])
        elif shape == "square":
            draw.rectangle(box, fill=RGB[color])
        else:  # triangle pointing up
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])],
                         fill=RGB[color])
    return img


def scene_from_image(img: Image.Image) -> Scene:
    """Read a ``render``ed image back into its scene (colour at each slot's centre, shape from
    how much of its bounding box the shape fills: square ~1, circle ~0.79, triangle ~0.5)."""
    slots = []
    for x0 in (0, SLOT):
        slot = img.convert("RGB").crop((x0, 0, x0 + SLOT, HEIGHT))
        color = next((c for c, rgb in RGB.items() if slot.getpixel((SLOT // 2, HEIGHT // 2)) == rgb),
                     None)
        if color is None:
            slots.append(None)
            continue
        area = sum(n for n, rgb in slot.getcolors() if rgb == RGB[color])
        x1, y1, x2, y2 = slot.convert("L").point(lambda v: 255 if v < 250 else 0).getbbox()
        fill = area / ((x2 - x1) * (y2 - y1))
        slots.append((color, "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"))
    return Scene(*slots)


def _word(w: str) -> str:
    return rf"\b{w}\b"


def _shape_word(s: str) -> str:
    return rf"\b{s}s?\b"


def _crit(cid: str, text: str, check: dict, weight: float | None = None) -> dict:
    c = {"id": cid, "text": text}
    if weight is not None:
        c["weight"] = weight
    return {**c, "check": check}


def _question(scene: Scene, kind: str, target: tuple[str, str] | None) -> tuple[str, str, dict]:
    """Instruction, reference answer and rubric for one question about ``scene``."""
    items = scene.items()
    present_c = {c for _, (c, _) in items}
    present_s = {s for _, (_, s) in items}
    absent_c = [c for c in COLORS if c not in present_c]
    absent_s = [s for s in SHAPES if s not in present_s]
    no_absent_color = (ABSENT_COLOR, {"none": [_word(c) for c in absent_c]})
    ess: list[tuple[str, dict]] = []
    add: list[tuple[str, dict, float]] = []
    if kind == "color":
        c, s = target
        instruction, reference = f"What color is the {s}?", f"The {s} is {c}."
        ess.append((f"States that the {s} is {c}.", {"any": [_word(c)]}))
        add.append((f"Names the {s} it is asked about.", {"any": [_shape_word(s)]}, 1.0))
    elif kind == "count":
        instruction = "How many shapes are there?"
        if len(items) == 1:
            reference = "There is one shape."
            ess.append(("States that there is one shape.", {"any": [r"\b(?:one|1)\b"]}))
            ess.append(("Does not claim there is more than one shape.",
                        {"none": [r"\b(?:two|three|four|2|3|4)\b"]}))
        else:
            reference = "There are two shapes."
            ess.append(("States that there are two shapes.", {"any": [r"\b(?:two|2)\b"]}))
            ess.append(("Does not claim there is one shape, or more than two.",
                        {"none": [r"\b(?:one|1)\s+shapes?\b", r"\b(?:only|just)\s+one\b",
                                  r"\b(?:three|four|3|4)\b"]}))
        add.append(("Says what is counted: shapes.", {"any": [r"\bshapes?\b"]}, 1.0))
    elif kind == "position":
        c, s = target
        side = next(side for side, obj in items if obj == target)
        other = "right" if side == "left" else "left"
        instruction, reference = f"Where is the {c} {s}?", f"The {c} {s} is on the {side}."
        ess.append((f"States that the {c} {s} is on the {side}.", {"any": [_word(side)]}))
        ess.append((f"Does not say the {c} {s} is on the {other}.", {"none": [_word(other)]}))
        add.append((f"Names the {s} it is asked about.", {"any": [_shape_word(s)]}, 1.0))
    else:  # describe
        instruction = "Describe the image."
        parts = [f"a {c} {s} on the {side}" for side, (c, s) in items]
        reference = "There is " + " and ".join(parts) + "."
        for _, (c, s) in items:
            ess.append((f"Mentions the colour {c}.", {"any": [_word(c)]}))
            ess.append((f"Mentions the {s}.", {"any": [_shape_word(s)]}))
        for side, (c, s) in items:
            placed = (rf"\b{c}\s+{s}\s+(?:is\s+)?on\s+the\s+{side}\b"
                      rf"|\bon\s+the\s+{side}\s+(?:is|there\s+is)\s+an?\s+{c}\s+{s}\b")
            add.append((f"Places the {c} {s} on the {side}.", {"any": [placed]}, 1.0))
    ess.append(no_absent_color)
    add.append((ABSENT_SHAPE, {"none": [_shape_word(s) for s in absent_s]}, 0.5))
    add.append(("Answers in a single sentence.", {"none": [r"\.\s*\S"]}, 0.5))
    add.append(("Ends with a full stop.", {"any": [r"\.\s*$"]}, 0.5))
    rubric = {"essential": [_crit(f"E{i}", t, chk) for i, (t, chk) in enumerate(ess, 1)],
              "additional": [_crit(f"A{i}", t, chk, w) for i, (t, chk, w) in enumerate(add, 1)]}
    return instruction, reference, rubric


def _outcome(rubric: dict) -> dict:
    """The coarse outcome check: "is the main answer right" = every positive essential fact is
    stated. Pitfalls (absent colours, a wrong side) are ignored, as a holistic verdict on the
    main answer ignores a hallucinated extra: that is what rubric filtering catches and outcome
    filtering does not."""
    facts = ["|".join(f"(?:{p})" for p in c["check"]["any"])
             for c in rubric["essential"] if "any" in c["check"]]
    return {"text": "States the main fact(s) of the reference answer.", "check": {"all": facts}}


def _record(rid: str, scene: Scene, kind: str, target) -> dict:
    instruction, reference, rubric = _question(scene, kind, target)
    return {"id": rid, "images": [f"images/{rid}.png"], "instruction": instruction,
            "reference": reference, "rubric": rubric, "outcome": _outcome(rubric)}


def _random_scene(rng: random.Random) -> Scene:
    c1, s1 = rng.choice(COLORS), rng.choice(SHAPES)
    if rng.random() < 0.5:
        return Scene((c1, s1), None) if rng.random() < 0.5 else Scene(None, (c1, s1))
    c2 = rng.choice([c for c in COLORS if c != c1])
    s2 = rng.choice([s for s in SHAPES if s != s1])
    return Scene((c1, s1), (c2, s2))


def _draw_records(ids: list[str], seed: int) -> list[tuple[dict, Scene, int]]:
    """(record, scene, render seed) per id, every (scene, instruction) pair distinct."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(200 * len(ids) + 1000):  # bounded: the task has only 528 distinct pairs
        if len(out) == len(ids):
            break
        scene, kind = _random_scene(rng), rng.choice(KINDS)
        target = rng.choice(scene.items())[1] if kind in ("color", "position") else None
        if (scene, kind, target) in seen:
            continue
        seen.add((scene, kind, target))
        out.append((_record(ids[len(out)], scene, kind, target), scene, rng.randrange(2**31)))
    if len(out) < len(ids):
        raise ValueError(f"toy task: asked for {len(ids)} distinct (scene, instruction) pairs, "
                         f"found only {len(out)}; the task has 528")
    return out


def make_records(n: int, *, seed: int, id_prefix: str) -> list[dict]:
    """``n`` pool records with distinct (scene, instruction) pairs, ids ``{id_prefix}-00000``..."""
    return [rec for rec, _, _ in _draw_records([f"{id_prefix}-{i:05d}" for i in range(n)], seed)]


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.exists() and path.read_bytes() == data):
        path.write_bytes(data)


def write_pools(out_dir: Path, *, n_train: int = 96, n_heldout: int = 48, seed: int = 0) -> ToyPools:
    """Write ``train.jsonl``, ``heldout.jsonl``, ``warmstart.jsonl`` and ``images/``.

    All pools come from one draw without repeated (scene, instruction) pairs, so no held-out
    prompt is ever trained on. The warm-start pool is the train pool plus every other pair of
    the task that is not held out (for the supervised warm start, which must learn to read the
    images, not memorise 96 of them). Same arguments give byte-identical files; unchanged files
    are not rewritten.
    """
    return write_task(out_dir, n_train, n_heldout, max(0, TOTAL_PAIRS - n_train - n_heldout),
                      seed, _draw_records, render)


def write_task(out_dir: Path, n_train: int, n_heldout: int, n_warm: int, seed: int,
               draw_records, render_scene) -> ToyPools:
    """The pools and images of a toy task (`write_pools` here and in `rdpo.demo.hardtoy`):
    ids train-*, heldout-*, warm-* drawn by `draw_records(ids, seed)` and drawn with
    `render_scene(scene, seed)`; the warm-start pool is the train pool plus the warm-* prompts."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    ids = [f"train-{i:05d}" for i in range(n_train)] + [f"heldout-{i:05d}" for i in range(n_heldout)]
    ids += [f"warm-{i:05d}" for i in range(n_warm)]
    records = []
    for rec, scene, render_seed in draw_records(ids, seed):
        buf = io.BytesIO()
        render_scene(scene, render_seed).save(buf, format="PNG")
        _write_if_changed(out_dir / rec["images"][0], buf.getvalue())
        records.append(rec)
    pools = ToyPools(train=out_dir / "train.jsonl", heldout=out_dir / "heldout.jsonl",
                     warmstart=out_dir / "warmstart.jsonl")
    train, held = records[:n_train], records[n_train:n_train + n_heldout]
    warm = train + records[n_train + n_heldout:]
    for path, recs in ((pools.train, train), (pools.heldout, held), (pools.warmstart, warm)):
        _write_if_changed(path, "".join(json.dumps(r) + "\n" for r in recs).encode())
    return pools


_ANSWER = re.compile(r"an? (\w+) (\w+) on the (\w+)|The (?:(\w+) )?(\w+) is (?:on the )?(\w+)\.")


def _absent(record: dict, words: tuple[str, ...], text: str) -> list[str]:
    """The words a pitfall criterion (found by its text) forbids: the absent colours/shapes."""
    rubric = record["rubric"]
    pats = next(c["check"]["none"] for c in rubric["essential"] + rubric["additional"]
                if c["text"] == text)
    return [w for w in words if any(re.search(p, w, re.IGNORECASE) for p in pats)]


def flawed_answers(record: dict, rng: random.Random) -> list[str]:
    """Plausible wrong answers for ``record``, one per entry of ``FLAW_KINDS``, in that order.

    ``hallucinate`` and ``wrong`` break an essential criterion; ``terse`` and ``ramble`` keep
    the facts right but break additional ones (full sentence, single sentence). Works on any
    record this module wrote: the facts are parsed from its reference and pitfall checks.
    """
    ref, instruction = record["reference"], record["instruction"]
    absent_c = _absent(record, COLORS, ABSENT_COLOR)
    hallucinate = (f"{ref} There is also a {rng.choice(absent_c)} "
                   f"{rng.choice(_absent(record, SHAPES, ABSENT_SHAPE))}.")
    m = _ANSWER.search(ref)
    if instruction.startswith("What color"):
        s, c = m.group(5), m.group(6)
        wrong = f"The {s} is {rng.choice([x for x in COLORS if x != c])}."
        terse = rng.choice([c, c.capitalize()])
    elif instruction.startswith("How many"):
        one = "one" in ref
        wrong = "There are two shapes." if one else "There is one shape."
        terse = rng.choice(["one", "1"] if one else ["two", "2"])
    elif instruction.startswith("Where is"):
        c, s, side = m.group(4, 5, 6)
        wrong = f"The {c} {s} is on the {'right' if side == 'left' else 'left'}."
        terse = rng.choice([side, f"{side} side"])
    else:
        items = [g.group(1, 2, 3) for g in _ANSWER.finditer(ref)]
        swap, new = rng.randrange(len(items)), rng.choice(absent_c)
        parts = [f"a {new if i == swap else c} {s} on the {side}"
                 for i, (c, s, side) in enumerate(items)]
        wrong = "There is " + " and ".join(parts) + "."
        terse = rng.choice([", ", " and "]).join(f"{c} {s}" for c, s, _ in items)
    return [hallucinate, wrong, terse, f"{ref} {rng.choice(FILLERS)}"]


def sft_targets(records: list[dict], *, flaw_rate: float, seed: int, copies: int = 4,
                flawed=None) -> list[tuple[dict, str]]:
    """``copies`` (record, answer) pairs per record for the SFT warm start.

    Each answer is the reference with probability ``1 - flaw_rate``, else a flawed answer of a
    uniformly chosen kind, so the warm-started policy makes the mistakes rDPO must remove.
    `flawed` makes the flawed answers (default: this task's `flawed_answers`).
    """
    flawed = flawed or flawed_answers
    rng = random.Random(seed)
    out = []
    for rec in records:
        for _ in range(copies):
            if rng.random() < flaw_rate:
                out.append((rec, rng.choice(flawed(rec, rng))))
            else:
                out.append((rec, rec["reference"]))
    return out


def _all_records() -> list[dict]:
    scenes = [Scene(o, None) for o in _objects()] + [Scene(None, o) for o in _objects()]
    scenes += [Scene(a, b) for a in _objects() for b in _objects() if a[0] != b[0] and a[1] != b[1]]
    records = []
    for scene in scenes:
        for kind in KINDS:
            targets = [obj for _, obj in scene.items()] if kind in ("color", "position") else [None]
            records += [_record("corpus", scene, kind, t) for t in targets]
    return records


def _objects() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def corpus() -> list[str]:
    """Every instruction, answer (reference and flawed) and criterion text the task can produce."""
    texts = set(FILLERS) | {f"There is also a {c} {s}." for c, s in _objects()}
    for i, rec in enumerate(_all_records()):
        texts |= {rec["instruction"], rec["reference"]}
        texts |= {c["text"] for part in rec["rubric"].values() for c in part}
        for j in range(3):
            texts |= set(flawed_answers(rec, random.Random(i * 3 + j)))
    return sorted(texts)
