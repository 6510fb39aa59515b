"""Ground truth of the shapes tasks: an answer's factual correctness read against the scene.

The independent yardstick of the ablation. It never reads a rubric: it regenerates each
prompt's scene from the toy settings (the task is a deterministic draw), parses the answer's
claims with its own small parser over the task's vocabulary (coloured shapes, bare colours and
shapes, numbers, left/right/above/below) and checks every claim against the scene.

Per answer: ``recall`` (the fraction of the facts the question asks for that the answer states
correctly), ``precision`` (true claims / claims; 1.0 without claims), ``score`` = recall x
precision, ``correct`` (every asked fact, no false claim), ``hallucination`` (claims a shape,
colour or coloured shape that is not there) and ``wrong`` (a false count, colour or position
of something that is there). Style (terse, rambling) does not count: facts only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rdpo.demo.hardtoy import NUMBERS
from rdpo.demo.toy import COLORS, SHAPES

RELATIONS = ("left", "right", "above", "below")
_TOKEN = re.compile(r"[a-z]+|\d+")
_SINGULAR = {f"{s}s": s for s in SHAPES} | {s: s for s in SHAPES}


@dataclass(frozen=True)
class Question:
    """What a prompt asks about its scene; objects are ``(color, shape, col, row)``."""

    kind: str
    """color, count, position (easy); count, count_color, relation (hard); describe (both)."""
    objects: tuple[tuple[str, str, int, int], ...]
    target: tuple = ()
    """color/position: the object; count_color: (colour,); relation: (object, other)."""


@dataclass(frozen=True)
class Truth:
    """One answer checked against the scene."""

    score: float
    recall: float
    precision: float
    correct: bool
    hallucination: bool
    wrong: bool


def _scope(words: list[str]) -> tuple | None:
    """What a number right before `words` counts: ``("all",)`` (n shapes), ``("color", c)``
    (n red shapes), ``("obj", c, s)`` (n red circles), or None (the question's quantity)."""
    w, nxt = (words + ["", ""])[:2]
    if w in ("shape", "shapes"):
        return ("all",)
    if w in COLORS and nxt in ("shape", "shapes"):
        return ("color", w)
    if w in COLORS and nxt in _SINGULAR:
        return ("obj", w, _SINGULAR[nxt])
    return None


def parse_claims(text: str) -> list[tuple]:
    """The answer's mentions in order: ``("obj", c, s)``, ``("group", c)`` (c shapes),
    ``("color", c)``, ``("shape", s)``, ``("number", n, scope)`` (`_scope`), ``("rel", word)``."""
    words = _TOKEN.findall(text.lower())
    out, i = [], 0
    while i < len(words):
        w, nxt = words[i], words[i + 1] if i + 1 < len(words) else ""
        if w in COLORS and nxt in _SINGULAR:
            out.append(("obj", w, _SINGULAR[nxt]))
            i += 1
        elif w in COLORS and nxt in ("shape", "shapes"):
            out.append(("group", w))
            i += 1
        elif w in COLORS:
            out.append(("color", w))
        elif w in _SINGULAR:
            out.append(("shape", _SINGULAR[w]))
        elif w in NUMBERS[1:] or (w.isdigit() and len(w) < 3):
            out.append(("number", NUMBERS.index(w) if w in NUMBERS else int(w),
                        _scope(words[i + 1:i + 3])))
        elif w in RELATIONS:
            out.append(("rel", w))
        i += 1
    return out


def _holds(rel: str, a, b) -> bool:
    return {"left": a[2] < b[2], "right": a[2] > b[2], "above": a[3] < b[3],
            "below": a[3] > b[3]}[rel]


def check(q: Question, text: str) -> Truth:
    """Check every claim of `text` against the scene of `q` (see the module docstring)."""
    combos = {(c, s): o for o in q.objects for c, s in [o[:2]]}
    colors, shapes = {o[0] for o in q.objects}, {o[1] for o in q.objects}
    asked: set = set()  # the asked facts this answer states correctly
    true = false_exist = false_attr = 0
    last = None  # the last coloured shape named, for "a red circle on the left" (easy describe)
    for claim in parse_claims(text):
        kind, ok, attr = claim[0], True, False
        if kind == "obj":
            c, s = claim[1:]
            ok = (c, s) in combos
            if q.kind == "color" and s == q.target[1]:
                ok, attr = c == q.target[0], True
                asked |= {"color"} if ok else set()
            last = combos.get((c, s))
            asked |= {("obj", c, s)} if ok else set()
        elif kind == "group":
            ok = claim[1] in colors
        elif kind == "color":
            if q.kind == "color":  # a bare colour answers the question about the shape
                ok, attr = claim[1] == q.target[0], True
                asked |= {"color"} if ok else set()
            else:
                ok = claim[1] in colors
        elif kind == "shape":
            ok = claim[1] in shapes
        elif kind == "number":
            scope = claim[2] or (("color", q.target[0]) if q.kind == "count_color" else ("all",))
            n = (len(q.objects) if scope[0] == "all" else
                 sum(o[0] == scope[1] for o in q.objects) if scope[0] == "color" else
                 int(tuple(scope[1:]) in combos))
            ok, attr = claim[1] == n, True
            # The asked count: all shapes (count), the asked colour's shapes (count_color).
            wanted = ("color", q.target[0]) if q.kind == "count_color" else ("all",)
            asked |= {"number"} if ok and scope == wanted else set()
        else:  # a relation word
            rel = claim[1]
            if q.kind == "relation":
                ok = _holds(rel, *q.target)
            elif q.kind == "position" and rel in ("left", "right"):
                ok = _holds(rel, q.target, (None, None, 0.5, 0))
            elif (q.kind == "describe" and len(q.objects) < 3 and last is not None
                  and rel in ("left", "right")):  # the easy task's "a red circle on the left"
                ok = _holds(rel, last, (None, None, 0.5, 0))
            else:
                continue  # no claim: a relation word without something to relate
            attr = True
            asked |= {rel} if ok else set()
        true += ok
        false_exist += not ok and not attr
        false_attr += not ok and attr
    facts = _asked(q)
    recall = len(facts & asked) / len(facts)
    claims = true + false_exist + false_attr
    precision = true / claims if claims else 1.0
    return Truth(recall * precision, recall, precision, recall == 1 and claims == true,
                 false_exist > 0, false_attr > 0)


def _asked(q: Question) -> set:
    if q.kind == "color":
        return {"color"}
    if q.kind in ("count", "count_color"):
        return {"number"}
    if q.kind == "position":
        return {"left" if q.target[2] == 0 else "right"}
    if q.kind == "relation":
        a, b = q.target
        return {"left" if a[2] < b[2] else "right", "above" if a[3] < b[3] else "below"}
    return {("obj", c, s) for c, s, _, _ in q.objects}


_HARD_Q = re.compile(r"How many (\w+ )?shapes are there\?|Where is the (\w+) (\w+) relative to "
                     r"the (\w+) (\w+)\?|Describe the image\.")
_EASY_Q = re.compile(r"What color is the (\w+)\?|How many shapes are there\?|Where is the (\w+) "
                     r"(\w+)\?|Describe the image\.")


def question(instruction: str, objects: tuple, hard: bool) -> Question:
    """The `Question` an instruction asks about a scene's objects."""
    find = {(c, s): o for o in objects for c, s in [o[:2]]}
    m = (_HARD_Q if hard else _EASY_Q).fullmatch(instruction)
    if m is None:
        raise ValueError(f"not a question of the {'hard' if hard else 'easy'} task: {instruction!r}")
    if instruction.startswith("Describe"):
        return Question("describe", objects)
    if hard and instruction.startswith("How many"):
        return (Question("count_color", objects, (m.group(1).strip(),)) if m.group(1)
                else Question("count", objects))
    if hard:
        return Question("relation", objects, (find[m.group(2, 3)], find[m.group(4, 5)]))
    if instruction.startswith("What color"):
        return Question("color", objects, next(o for o in objects if o[1] == m.group(1)))
    if instruction.startswith("How many"):
        return Question("count", objects)
    return Question("position", objects, find[m.group(2, 3)])


class GroundTruth:
    """The questions of a toy task's train and held-out prompts, by prompt id.

    ``GroundTruth.for_toy(cfg.toy)`` regenerates the draw (`rdpo.demo.toy`,
    `rdpo.demo.hardtoy`); `check_records` confirms the pool on disk is that draw.
    """

    def __init__(self, questions: dict[str, Question], instructions: dict[str, str]):
        self.questions, self.instructions = questions, instructions

    @classmethod
    def for_toy(cls, toy) -> GroundTruth:
        from rdpo.demo import hardtoy
        from rdpo.demo import toy as easy

        hard = toy.task == "hard"
        ids = ([f"train-{i:05d}" for i in range(toy.n_train)]
               + [f"heldout-{i:05d}" for i in range(toy.n_heldout)])
        draw = hardtoy.draw_records if hard else easy._draw_records
        questions, instructions = {}, {}
        for rec, scene, _ in draw(ids, toy.task_seed):
            objects = (scene.objects if hard else  # easy: left is column 0, right column 1
                       tuple((c, s, int(side == "right"), 0) for side, (c, s) in scene.items()))
            questions[rec["id"]] = question(rec["instruction"], objects, hard)
            instructions[rec["id"]] = rec["instruction"]
        return cls(questions, instructions)

    def check_records(self, records: Sequence) -> None:
        """Raise ValueError naming each prompt whose id or instruction is not this task's."""
        bad = [f"{r.id} ({getattr(r, 'source', '?')})" for r in records
               if self.instructions.get(r.id) != r.instruction]
        if bad:
            raise ValueError(f"ground truth: {len(bad)} prompt(s) are not the toy draw of these "
                             f"toy settings: {', '.join(bad[:5])}")

    def check(self, record_id: str, text: str) -> Truth:
        return check(self.questions[record_id], text)

    def summary(self, items: Sequence[tuple[str, Sequence[str]]]) -> dict:
        """Mean `Truth` fields over every (prompt id, responses) answer: ``truth_score``,
        ``truth_correct_rate``, ``hallucination_rate``, ``wrong_fact_rate``."""
        ts = [self.check(rid, r) for rid, rs in items for r in rs]
        n = max(1, len(ts))
        return {"truth_score": sum(t.score for t in ts) / n,
                "truth_correct_rate": sum(t.correct for t in ts) / n,
                "hallucination_rate": sum(t.hallucination for t in ts) / n,
                "wrong_fact_rate": sum(t.wrong for t in ts) / n}
