"""Pairwise preference data: a prompt, two responses, which one people preferred, and optionally
the prompt's rubric (what `python -m rdpo.evaluate judge` scores a judge on, what
scripts/convert_vlrewardbench.py writes, and the discrimination check of `python -m rdpo.rubrics
audit` reads).

Preference records: ``id``, ``images`` (paths relative to the file), ``instruction``,
``responses`` (two strings), ``preferred`` (0 or 1), optional ``rubric`` (pool schema).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rdpo.pool import (
    PromptRecord,
    Rubric,
    check_id_and_instruction,
    check_images,
    check_rubric,
    jsonl_objects,
)


@dataclass(frozen=True)
class PreferencePair:
    """One pairwise preference record; `record` carries images, instruction and rubric."""

    record: PromptRecord
    responses: tuple[str, str]
    preferred: int
    has_rubric: bool


PAIR_KEYS = frozenset({"id", "images", "instruction", "responses", "preferred", "rubric"})


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """Read and validate a preference file; raise ValueError listing every FILE:LINE problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: preference data file not found")
    base, problems, out, seen = path.resolve().parent, [], [], {}
    for lineno, raw, report in jsonl_objects(path, problems):
        extra = sorted(set(raw) - PAIR_KEYS)
        if extra:
            report("record", f"unknown key(s) {extra}; allowed: {', '.join(sorted(PAIR_KEYS))}")
        check_id_and_instruction(raw, lineno, seen, report)
        responses = raw.get("responses")
        if (not isinstance(responses, list) or len(responses) != 2
                or not all(isinstance(r, str) for r in responses)):
            report("responses", "must be a list of exactly two strings")
        preferred = raw.get("preferred")
        if isinstance(preferred, bool) or preferred not in (0, 1):
            report("preferred", f"must be 0 or 1, got {preferred!r}")
        images = check_images(raw.get("images"), base, True, report)
        rubric = None
        if raw.get("rubric") is not None:
            rubric = check_rubric(raw["rubric"], report)
        if report.count:
            continue
        record = PromptRecord(id=raw["id"], images=images, instruction=raw["instruction"],
                              rubric=rubric or Rubric(essential=(), additional=()),
                              source=f"{path}:{lineno}")
        out.append(PreferencePair(record, tuple(responses), preferred, rubric is not None))
    if problems:
        raise ValueError("\n".join(str(p) for p in problems))
    if not out:
        raise ValueError(f"{path}: no preference records")
    return out
