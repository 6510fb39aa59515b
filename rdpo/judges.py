"""Judges: give a verdict per (response, criterion) of a prompt's rubric.

A verdict is True (met), False (not met) or None (the judge cannot tell). Every judge has the
same `judge(record, responses)` method, so the scoring callback does not care which it holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from rdpo.pool import PromptRecord


class RuleJudge:
    """Judges responses with the regex `check` written in the rubric; a criterion without `check` is unknown (None).

    Patterns are Python regexes matched with `re.search` and `re.IGNORECASE`. `any` is met if
    at least one pattern matches, `all` if every pattern matches, `none` if no pattern
    matches; the keys present combine with AND. Needs no model, so it is the judge of the
    CPU quickstart and of tests, and a cheap first pass for checkable facts.
    """

    name = "rule"

    def __init__(self) -> None:
        # Rounds re-judge the same rubrics every time; compile each pattern once.
        self._compiled: dict[str, re.Pattern[str]] = {}

    def _search(self, pattern: str, text: str) -> bool:
        compiled = self._compiled.get(pattern)
        if compiled is None:
            compiled = self._compiled[pattern] = re.compile(pattern, re.IGNORECASE)
        return compiled.search(text) is not None

    def check(self, check: Mapping[str, Sequence[str]], text: str) -> bool:
        """Whether `text` satisfies one criterion's `check` object."""
        unknown = set(check) - {"any", "all", "none"}
        if unknown:
            raise ValueError(f"unknown check key(s) {sorted(unknown)}")
        if not check:
            raise ValueError("empty check")
        met = True
        if "any" in check:
            met &= any(self._search(p, text) for p in check["any"])
        if "all" in check:
            met &= all(self._search(p, text) for p in check["all"])
        if "none" in check:
            met &= not any(self._search(p, text) for p in check["none"])
        return met

    def judge(self, record: PromptRecord, responses: Sequence[str]) -> list[dict[str, bool | None]]:
        """One verdict dict (criterion id -> met) per response, in response order."""
        criteria = record.rubric.criteria()
        return [
            {
                c.id: (self.check(c.check, response) if c.check is not None else None)
                for c in criteria
            }
            for response in responses
        ]
