"""What a run spends, round by round: run.dir/cost.json.

Every round records, over all ranks: the judge's requests (sent to its backend; each re-ask of
an unreadable answer counts), its cache hits (judgments read from the judge cache, free), its
prompt and completion tokens (an OpenAI-compatible server's ``usage``; a local transformers
judge's own tokenizer; 0 for the rule judge), the same four for the audit judge
(``judge.audit``), the responses the policy sampled and their tokens (the ids of
``rounds/NNNN/rollouts.jsonl``, end-of-turn ids included), the pairs kept, and wall seconds per
phase: ``sampling``, ``judging``, ``reference`` (log-probs), ``audit`` and ``training`` (the
steps until the next round). Counts are summed over ranks; seconds are the slowest rank's
(ranks work at once and wait for each other at the round's end). In a pipelined round the
phases overlap, so their seconds add up to more than the round's wall time.

cost.json (written atomically by rank 0 after each round, as training goes on and at the end,
so a crash keeps what was spent)::

    {"rounds": [ROW, ...],          one row per round the run trained on
     "total": {...},                the rows summed: what the run's rounds cost
     "outside_rounds": {...},       the judges' work outside rounds (held-out evaluation)
     "redone": {...},               work a resumed run did again (see below)
     "spent": {...},                total + outside_rounds + redone: everything paid for
     "prices": {...}}

Money: with ``judge.price_input_per_mtok`` and ``judge.price_output_per_mtok`` (and the audit
judge's own) each row and sum has ``money`` (judge, audit, total, per kept pair). A price left
null is unknown, not free: money spent at it is null; tokens never spent (the rule judge) cost 0.

Resume: the checkpoint carries the rows it covers (`CostLedger.state`). A resumed run keeps
them and moves what the file holds beyond them (a round built after the checkpoint, training
seconds after it) to ``redone``: that work was paid for and is done again, so the run's own
rows equal an uninterrupted run's (seconds aside) and nothing spent is lost.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("rdpo")

FILE = "cost.json"
PHASES = ("sampling", "judging", "reference", "audit", "training")
JUDGE_KEYS = ("requests", "cache_hits", "prompt_tokens", "completion_tokens")
COUNTS = (*(f"judge_{k}" for k in JUDGE_KEYS), *(f"audit_{k}" for k in JUDGE_KEYS),
          "responses", "sampled_tokens", "pairs_kept")
WRITE_EVERY = 10.0
"""Seconds between writes of the training seconds while a round trains."""


def judge_counters(judge) -> dict[str, int]:
    """What `judge` has spent so far (`rdpo.judging.judges.ChatJudge.counters`); zeros for a
    judge that asks nobody (rule judges) or keeps no count (a user's own)."""
    counters = getattr(judge, "counters", None)
    got = counters() if callable(counters) else {}
    return {k: int(got.get(k, 0)) for k in JUDGE_KEYS}


def _minus(a: dict, b: dict) -> dict:
    return {k: a[k] - b[k] for k in a}


@dataclass(frozen=True)
class Prices:
    """A judge's prices per million tokens; None is unknown."""

    input_per_mtok: float | None = None
    output_per_mtok: float | None = None

    @classmethod
    def of(cls, judge_cfg) -> Prices | None:
        """The prices of a `rdpo.config.JudgeConfig` section (None for no section)."""
        if judge_cfg is None:
            return None
        return cls(judge_cfg.price_input_per_mtok, judge_cfg.price_output_per_mtok)

    def money(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The price of these tokens: None when some were spent at an unknown price."""
        total = 0.0
        for tokens, price in ((prompt_tokens, self.input_per_mtok),
                              (completion_tokens, self.output_per_mtok)):
            if tokens:
                if price is None:
                    return None
                total += tokens * price / 1e6
        return total


class RoundCost:
    """One rank's account of one round while it is built: the judges' counters when it began."""

    def __init__(self, judge, audit=None):
        self.judge, self.audit = judge, audit
        self._start = (judge_counters(judge), judge_counters(audit))

    def part(self, seconds: dict[str, float] | None = None) -> dict:
        """This rank's share of the round: the judges' counters spent since it began and the
        `seconds` of each phase (``sampling``, ``judging``, ``reference``, ``audit``)."""
        judge = _minus(judge_counters(self.judge), self._start[0])
        audit = _minus(judge_counters(self.audit), self._start[1])
        return {**{f"judge_{k}": v for k, v in judge.items()},
                **{f"audit_{k}": v for k, v in audit.items()}, "seconds": dict(seconds or {})}


def sampled_tokens(scored: Iterable) -> tuple[int, int]:
    """(responses, token ids sampled) of a round's scored rollouts (`rdpo.rounds.ScoredRollout`)."""
    responses = tokens = 0
    for s in scored:
        responses += len(s.rollout.responses)
        tokens += sum(len(ids) for ids in s.rollout.token_ids)
    return responses, tokens


def round_row(index: int, step: int, parts: Sequence[dict], responses: int, tokens: int,
              pairs_kept: int) -> dict:
    """A round's row from every rank's `RoundCost.part` (counts summed, seconds the slowest
    rank's) and the whole round's responses, sampled tokens and kept pairs."""
    row = {"round": index, "step": step, "responses": responses, "sampled_tokens": tokens,
           "pairs_kept": pairs_kept}
    for key in COUNTS[:8]:
        row[key] = sum(p[key] for p in parts)
    row["seconds"] = {ph: max((p["seconds"].get(ph, 0.0) for p in parts), default=0.0)
                      for ph in PHASES[:-1]}
    row["seconds"]["training"] = 0.0
    return row


def _zero() -> dict:
    return {**dict.fromkeys(COUNTS, 0), "seconds": dict.fromkeys(PHASES, 0.0)}


def _add(into: dict, row: dict) -> None:
    for key in COUNTS:
        into[key] = into.get(key, 0) + row.get(key, 0)
    seconds = into.setdefault("seconds", dict.fromkeys(PHASES, 0.0))
    for ph in PHASES:
        seconds[ph] = seconds.get(ph, 0.0) + row.get("seconds", {}).get(ph, 0.0)


class CostLedger:
    """cost.json of a run: the rows of its rounds, the judges' work outside rounds and the work
    a resumed run did again, priced by `judge` and `audit` (`Prices`; audit None: no audit
    judge). `path` None keeps everything in memory."""

    def __init__(self, path: str | Path | None, judge: Prices | None = None,
                 audit: Prices | None = None):
        self.path = Path(path) if path is not None else None
        self.judge_prices, self.audit_prices = judge or Prices(), audit
        self.rows: list[dict] = []
        self.outside = _zero()
        self.redone = {**_zero(), "rounds": []}
        self._written = float("-inf")

    def put(self, row: dict) -> None:
        """A round's row (a row of the same round is replaced)."""
        self.rows = [r for r in self.rows if r["round"] != row["round"]] + [row]
        self.rows.sort(key=lambda r: r["round"])

    def add_training(self, index: int, seconds: float) -> None:
        """Training seconds of round `index` (nothing for a round without a row)."""
        for row in self.rows:
            if row["round"] == index:
                row["seconds"]["training"] += seconds

    def add_outside(self, part: dict) -> None:
        """The judges' counters spent outside rounds (`RoundCost.part`-shaped, no seconds)."""
        _add(self.outside, {**part, "seconds": {}})

    def state(self) -> dict:
        """The rows, for the checkpoint (plain types)."""
        return {"rows": json.loads(json.dumps(self.rows))}

    def load(self, state: dict | None) -> None:
        self.rows = list((state or {}).get("rows", []))

    def continue_file(self) -> None:
        """A resumed run (rows from its checkpoint): keep what the file says was spent outside
        rounds and redone, and move what it holds beyond the checkpoint's rows to ``redone``."""
        if self.path is None or not self.path.is_file():
            return
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable (%s); the costs before this resume are not carried over",
                        self.path, err)
            return
        self.outside = old.get("outside_rounds") or _zero()
        self.redone = {**_zero(), "rounds": []}
        _add(self.redone, old.get("redone") or {})
        self.redone["rounds"] = list((old.get("redone") or {}).get("rounds", []))
        mine = {r["round"]: r for r in self.rows}
        for row in old.get("rounds", []):
            kept = mine.get(row["round"])
            if kept is None:
                _add(self.redone, row)
                self.redone["rounds"].append(row["round"])
                continue
            extra = row["seconds"].get("training", 0.0) - kept["seconds"].get("training", 0.0)
            self.redone["seconds"]["training"] += max(0.0, extra)

    def _money(self, row: dict) -> dict:
        judge = self.judge_prices.money(row["judge_prompt_tokens"], row["judge_completion_tokens"])
        spent = row["audit_prompt_tokens"] or row["audit_completion_tokens"]
        audit = (self.audit_prices or Prices()).money(row["audit_prompt_tokens"],
                                                      row["audit_completion_tokens"]) \
            if spent else 0.0
        total = None if judge is None or audit is None else judge + audit
        per_pair = total / row["pairs_kept"] if total is not None and row["pairs_kept"] else None
        return {"judge": judge, "audit": audit, "total": total, "per_pair": per_pair}

    def document(self) -> dict:
        """cost.json's content (see the module docstring)."""
        total = _zero()
        for row in self.rows:
            _add(total, row)
        total["rounds"] = len(self.rows)
        spent = _zero()
        for part in (total, self.outside, self.redone):
            _add(spent, part)

        def priced(row: dict) -> dict:  # a copy: the caller may keep it while rows grow
            return {**json.loads(json.dumps(row)), "money": self._money(row)}
        return {"rounds": [priced(r) for r in self.rows], "total": priced(total),
                "outside_rounds": priced(self.outside), "redone": priced(self.redone),
                "spent": priced(spent),
                "prices": {"judge": self.judge_prices.__dict__,
                           "audit": self.audit_prices.__dict__ if self.audit_prices else None}}

    def write(self, *, at_most_every: float = 0.0) -> None:
        """Write cost.json atomically (`rdpo.rundir.atomic_write`); `at_most_every`: skip it
        when the last write is more recent than that many seconds."""
        if self.path is None or time.monotonic() - self._written < at_most_every:
            return
        from rdpo.rundir import atomic_write

        atomic_write(self.path, json.dumps(self.document(), indent=1) + "\n")
        self._written = time.monotonic()


__all__ = ["FILE", "PHASES", "CostLedger", "Prices", "RoundCost", "judge_counters", "round_row",
           "sampled_tokens"]
