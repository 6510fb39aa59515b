"""The harder variant of the shapes task (``toy.task=hard``): 3-6 shapes on a 3x2 grid.

Each image holds 3 to 6 shapes, each a distinct (colour, shape) pair in its own cell of a grid
of 3 columns and 2 rows, drawn in the easy task's 112x56 frame. Four question kinds: count all
shapes, count the shapes of one colour, where one shape is relative to another (left of / right
of and above / below: the two always differ in column and row), and describe (every shape).
Rubrics have more criteria than the easy task's (a describe prompt: one per shape plus pitfalls),
so two partly-right answers differ in which criteria they meet, where one holistic score
cannot tell them apart. Records have the easy task's form (`rdpo.demo.toy`), and like there the
flawed answers are read back from a record's reference and pitfall checks.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from rdpo.demo.toy import (
    ABSENT_COLOR,
    ABSENT_SHAPE,
    COLORS,
    FILLERS,
    HEIGHT,
    RGB,
    SHAPES,
    WIDTH,
    ToyPools,
    _crit,
    _outcome,
    _shape_word,
    _word,
    write_task,
)

KINDS = ("count", "count_color", "relation", "describe")
COLS, ROWS = 3, 2
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
ABSENT_OBJECT = "Does not name a coloured shape that is absent from the image."


@dataclass(frozen=True)
class HardScene:
    """The shapes as ``(color, shape, col, row)``, in reading order (row, then column)."""

    objects: tuple[tuple[str, str, int, int], ...]

    def combos(self) -> set[tuple[str, str]]:
        return {(c, s) for c, s, _, _ in self.objects}


def _number(n: int) -> str:
    return rf"\b(?:{NUMBERS[n]}|{n})\b"


def _other_numbers(n: int) -> list[str]:
    return [_number(k) for k in range(1, 7) if k != n]


def _combo(c: str, s: str) -> str:
    return rf"\b{c}\s+{s}s?\b"


def render(scene: HardScene, seed: int) -> Image.Image:
    """Draw ``scene`` at 112x56: a shape of 18-22 px, jittered, centred in its grid cell."""
    rng = random.Random(seed)
    img = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cw, ch = WIDTH / COLS, HEIGHT / ROWS
    for c, s, col, row in scene.objects:
        size, dx, dy = rng.randint(18, 22), rng.randint(-2, 2), rng.randint(-2, 2)
        left = int(col * cw + cw / 2 + dx - size / 2)
        top = int(row * ch + ch / 2 + dy - size / 2)
        box = (left, top, left + size - 1, top + size - 1)
        if s == "circle":
            draw.ellipse(box, fill=RGB[c])
        elif s == "square":
            draw.rectangle(box, fill=RGB[c])
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])],
                         fill=RGB[c])
    return img


def _relation(a, b) -> tuple[str, str]:
    return ("left" if a[2] < b[2] else "right"), ("above" if a[3] < b[3] else "below")


def _question(scene: HardScene, kind: str, target) -> tuple[str, str, dict]:
    """Instruction, reference answer and rubric of one question about ``scene``."""
    objs, n = scene.objects, len(scene.objects)
    absent_c = [c for c in COLORS if c not in {o[0] for o in objs}]
    absent_s = [s for s in SHAPES if s not in {o[1] for o in objs}]
    absent_o = [_combo(c, s) for c in COLORS for s in SHAPES if (c, s) not in scene.combos()]
    ess: list[tuple[str, dict]] = []
    add: list[tuple[str, dict, float]] = []
    if kind in ("count", "count_color"):
        what = "shapes" if kind == "count" else f"{target} shapes"
        k = n if kind == "count" else sum(o[0] == target for o in objs)
        instruction = f"How many {what} are there?"
        noun = what if k > 1 else what[:-1]
        reference = f"There {'are' if k > 1 else 'is'} {NUMBERS[k]} {noun}."
        # The number with what it counts ("two red shapes"), or the number alone as the answer:
        # "one green shape" does not answer how many red shapes there are.
        colour = "" if kind == "count" else rf"{target}\s+"
        counted = rf"{_number(k)}\s+{colour}shapes?\b"
        bare = rf"^\W*{_number(k)}\W*$"
        ess.append((f"States that there {'are' if k > 1 else 'is'} {k} {noun}.",
                    {"any": [counted, bare]}))
        ess.append(("Does not state another number.", {"none": _other_numbers(k)}))
        pat = r"\bshapes?\b" if kind == "count" else rf"\b{target}\s+shapes?\b"
        add.append((f"Says what is counted: {what}.", {"any": [pat]}, 1.0))
    elif kind == "relation":
        a, b = target
        h, v = _relation(a, b)
        na, nb = f"{a[0]} {a[1]}", f"{b[0]} {b[1]}"
        instruction = f"Where is the {na} relative to the {nb}?"
        reference = f"The {na} is {h} of and {v} the {nb}."
        ess.append((f"States that the {na} is {h} of the {nb}.", {"any": [_word(h)]}))
        ess.append((f"States that the {na} is {v} the {nb}.", {"any": [_word(v)]}))
        wrong = ["right" if h == "left" else "left", "below" if v == "above" else "above"]
        ess.append(("Does not state the opposite relation.", {"none": [_word(w) for w in wrong]}))
        add.append(("Names both shapes.", {"all": [_combo(*a[:2]), _combo(*b[:2])]}, 1.0))
    else:  # describe
        instruction = "Describe the image."
        names = [f"a {c} {s}" for c, s, _, _ in objs]
        reference = f"There are {NUMBERS[n]} shapes: {', '.join(names[:-1])} and {names[-1]}."
        for c, s, _, _ in objs:
            ess.append((f"Mentions the {c} {s}.", {"any": [_combo(c, s)]}))
        add.append((f"States that there are {n} shapes.", {"any": [_number(n)]}, 1.0))
    if absent_c:
        ess.append((ABSENT_COLOR, {"none": [_word(c) for c in absent_c]}))
    ess.append((ABSENT_OBJECT, {"none": absent_o}))
    if absent_s:
        add.append((ABSENT_SHAPE, {"none": [_shape_word(s) for s in absent_s]}, 0.5))
    add.append(("Answers in a single sentence.", {"none": [r"\.\s*\S"]}, 0.5))
    add.append(("Ends with a full stop.", {"any": [r"\.\s*$"]}, 0.5))
    rubric = {"essential": [_crit(f"E{i}", t, chk) for i, (t, chk) in enumerate(ess, 1)],
              "additional": [_crit(f"A{i}", t, chk, w) for i, (t, chk, w) in enumerate(add, 1)]}
    return instruction, reference, rubric


def random_scene(rng: random.Random) -> HardScene:
    combos = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(3, 6))
    cells = rng.sample([(col, row) for row in range(ROWS) for col in range(COLS)], len(combos))
    objs = sorted(((c, s, col, row) for (c, s), (col, row) in zip(combos, cells, strict=True)),
                  key=lambda o: (o[3], o[2]))
    return HardScene(tuple(objs))


def _target(scene: HardScene, kind: str, rng: random.Random):
    if kind == "count_color":
        return rng.choice(sorted({o[0] for o in scene.objects}))
    if kind == "relation":
        pairs = [(a, b) for a in scene.objects for b in scene.objects
                 if a[2] != b[2] and a[3] != b[3]]
        return rng.choice(pairs) if pairs else None
    return None


def draw_records(ids: list[str], seed: int) -> list[tuple[dict, HardScene, int]]:
    """(record, scene, render seed) per id; every (scene, instruction) pair distinct."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < len(ids):
        scene, kind = random_scene(rng), rng.choice(KINDS)
        target = _target(scene, kind, rng)
        if (kind == "relation" and target is None) or (scene, kind, target) in seen:
            continue
        seen.add((scene, kind, target))
        instruction, reference, rubric = _question(scene, kind, target)
        rid = ids[len(out)]
        rec = {"id": rid, "images": [f"images/{rid}.png"], "instruction": instruction,
               "reference": reference, "rubric": rubric, "outcome": _outcome(rubric)}
        out.append((rec, scene, rng.randrange(2**31)))
    return out


def write_pools(out_dir: Path, *, n_train: int = 96, n_heldout: int = 48, seed: int = 0,
                n_warm: int = 1500) -> ToyPools:
    """Like `rdpo.demo.toy.write_pools`: train, held-out and warm-start pools (the warm-start
    pool is the train pool plus `n_warm` more prompts, none held out) and their images."""
    return write_task(out_dir, n_train, n_heldout, n_warm, seed, draw_records, render)


_OBJ = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def _pitfall(record: dict, text: str) -> list[str]:
    r = record["rubric"]
    return next((c["check"]["none"] for c in r["essential"] + r["additional"]
                 if c["text"] == text), [])


def flawed_answers(record: dict, rng: random.Random) -> list[str]:
    """One answer per flaw kind (hallucinate, wrong, terse, ramble), read from the record."""
    ref, ins = record["reference"], record["instruction"]
    absent = [re.sub(r"\\b|s\?|\\s\+", " ", p).split() for p in _pitfall(record, ABSENT_OBJECT)]
    c, s = rng.choice(absent)
    hallucinate = f"{ref} There is also a {c} {s}."
    if ins.startswith("How many"):
        k = next(i for i, w in enumerate(NUMBERS) if re.search(rf"\b{w}\b", ref))
        other = rng.choice([i for i in range(1, 7) if i != k])
        wrong = re.sub(rf"\b{NUMBERS[k]}\b", NUMBERS[other], ref)
        terse = rng.choice([NUMBERS[k], str(k)])
    elif ins.startswith("Where is"):
        h, v = re.search(r"is (left|right) of and (above|below)", ref).groups()
        flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
        which = rng.randrange(3)  # one relation wrong, or both: partly-right answers
        wrong = ref.replace(f"{h} of and {v}", f"{flip[h] if which != 1 else h} of and "
                                               f"{flip[v] if which != 0 else v}")
        terse = rng.choice([f"{h}, {v}", f"{h} and {v}", f"{h} of and {v}"])
    else:
        objs = _OBJ.findall(ref)
        i = rng.randrange(len(objs))
        cols = [x for x in COLORS if x != objs[i][0]]
        if rng.random() < 0.5 and len(objs) > 1:  # forget one shape (partly right)
            kept = objs[:i] + objs[i + 1:]
        else:  # one shape in the wrong colour
            kept = [(rng.choice(cols), o[1]) if j == i else o for j, o in enumerate(objs)]
        names = [f"a {a} {b}" for a, b in kept]
        wrong = f"There are {NUMBERS[len(objs)]} shapes: {', '.join(names[:-1])} and {names[-1]}."
        terse = rng.choice([", ", " and "]).join(f"{a} {b}" for a, b in objs)
    return [hallucinate, wrong, terse, f"{ref} {rng.choice(FILLERS)}"]


def corpus() -> list[str]:
    """Instructions, answers and criterion texts of a sample of the task (the tokenizer's)."""
    texts = set(FILLERS) | {f"There is also a {c} {s}." for c in COLORS for s in SHAPES}
    rng = random.Random(0)
    ids = [f"corpus-{i}" for i in range(600)]
    for rec, _, _ in draw_records(ids, seed=12345):
        texts |= {rec["instruction"], rec["reference"]}
        texts |= {c["text"] for part in rec["rubric"].values() for c in part}
        texts |= set(flawed_answers(rec, rng))
    return sorted(texts)
