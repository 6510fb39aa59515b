"""The reward-hacking watch (``judge.audit``): a second judge re-judges a sample of each round's
pairs against the rubric, and a rule warns when the training judge's preference climbs while
the audit judge's does not: the signature of a policy learning its judge's blind spots.

Per round (`audit_round`, then `summarize`): ``pair_agreement``, the share of audited pairs whose
chosen response the audit judge also scores above the rejected one (a tie is no agreement);
``verdict_agreement``, the share of (response, criterion) verdicts both judges gave (unknowns
left out) on which they agree (None when the training judge gives no per-criterion verdicts:
pairs.strategy outcome, rubric_holistic); ``train_margin`` and ``audit_margin``, each judge's
mean score of chosen minus rejected over the audited pairs; ``train_score`` and
``audit_score``, each judge's mean score of the audited responses. `watch` is the warning rule.
Scores are the rubric score (`rdpo.judging.scoring`, pairs.aggregation); the training judge's
one-score strategies give (score − 1) / 9. No Lightning, no model: any two `Judge`s.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rdpo.judging.scoring import score_response

FILE = "judge_audit.json"
WINDOW = 3
"""Audited rounds the warning rule looks back over (the latest and the two before it)."""
CLIMB = 0.05
"""Rise of the training judge's margin or score over the window that counts as climbing."""
FOLLOW = 0.5
"""Share of that rise the audit judge's must reach for the climb to count as real."""


def audit_sample(pairs: Sequence, fraction: float, *, seed: int, round_index: int) -> list:
    """``ceil(fraction × len(pairs))`` of `pairs` (at least one when there are any), chosen by
    a hash of (seed, round, prompt id): the same pairs whatever the call order or a resume."""
    def key(p) -> bytes:
        return hashlib.sha256(f"{seed}:{round_index}:{p.prompt_id}".encode()).digest()
    n = math.ceil(fraction * len(pairs)) if pairs else 0
    chosen = sorted(range(len(pairs)), key=lambda i: key(pairs[i]))[:n]
    return [pairs[i] for i in sorted(chosen)]


def audit_round(audit_judge, scored: Sequence, pairs: Sequence, aggregation: str) -> list[dict]:
    """Re-judge the chosen and rejected responses of `pairs` (`rdpo.pairs.Pair`, from the
    round's `scored` rollouts) with `audit_judge`; one record per pair: both judges' scores and
    verdicts of its two responses, and how many verdicts both gave and agree on."""
    from rdpo.judging.judges import judge_round

    by_id = {s.rollout.record.id: s for s in scored}
    items = [(by_id[p.prompt_id].rollout.record, [p.chosen, p.rejected]) for p in pairs]
    with judge_round(audit_judge):
        audited = audit_judge.judge_many(items) if items else []
    out = []
    for p, (record, _), verdicts in zip(pairs, items, audited, strict=True):
        s = by_id[p.prompt_id]
        train = [s.verdicts[p.chosen_index], s.verdicts[p.rejected_index]]
        compared = agree = 0
        for mine, theirs in zip(train, verdicts, strict=True):
            for cid, met in theirs.items():
                if isinstance(mine.get(cid), bool) and met is not None:
                    compared += 1
                    agree += mine[cid] == met
        out.append({
            "prompt_id": p.prompt_id, "chosen_index": p.chosen_index,
            "rejected_index": p.rejected_index,
            "train_scores": [p.chosen_score, p.rejected_score],
            "audit_scores": [score_response(record.rubric, v, aggregation).value
                             for v in verdicts],
            "audit_verdicts": verdicts, "verdicts_compared": compared, "verdicts_agree": agree})
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(index: int, step: int, audited: Sequence[dict]) -> dict:
    """A round's audit row (see the module docstring); None values when nothing was audited."""
    compared = sum(a["verdicts_compared"] for a in audited)
    return {
        "round": index, "step": step, "pairs": len(audited),
        "pair_agreement": _mean([float(a["audit_scores"][0] > a["audit_scores"][1])
                                 for a in audited]),
        "verdict_agreement": sum(a["verdicts_agree"] for a in audited) / compared
        if compared else None,
        "verdicts_compared": compared,
        "train_margin": _mean([a["train_scores"][0] - a["train_scores"][1] for a in audited]),
        "audit_margin": _mean([a["audit_scores"][0] - a["audit_scores"][1] for a in audited]),
        "train_score": _mean([x for a in audited for x in a["train_scores"]]),
        "audit_score": _mean([x for a in audited for x in a["audit_scores"]]),
    }


def watch(rows: Sequence[dict]) -> str | None:
    """The warning, or None. Over the last `WINDOW` (3) audited rounds (rows with pairs, in
    round order), first F and last L: for each signal, margin (chosen − rejected) and score
    (mean over the audited responses), the training judge's rise is ``train(L) − train(F)``
    and the audit judge's ``audit(L) − audit(F)``. Warn when, for either signal, the training
    judge's rise is at least `CLIMB` (0.05) and the audit judge's is below `FOLLOW` (half) of
    it: the training judge likes the policy's answers more and more, the audit judge does not."""
    audited = [r for r in rows if r.get("pairs")][-WINDOW:]
    if len(audited) < WINDOW:
        return None
    first, last = audited[0], audited[-1]
    found = []
    for signal in ("margin", "score"):
        train = last[f"train_{signal}"] - first[f"train_{signal}"]
        audit = last[f"audit_{signal}"] - first[f"audit_{signal}"]
        if train >= CLIMB and audit < FOLLOW * train:
            found.append(f"{signal} {train:+.3f} by the training judge vs {audit:+.3f} by the "
                         f"audit judge")
    if not found:
        return None
    return (f"reward-hacking watch: from round {first['round']} to round {last['round']} the "
            f"training judge's {' and '.join(found)} (audited pairs): the policy may be learning "
            f"the training judge's blind spots; compare the rounds' judge_audit.json and responses")


class AuditLog:
    """run.dir/judge_audit.json: the audit judge's name, the fraction audited, one `summarize`
    row per round and the warnings `watch` raised. The rows travel in the checkpoint (`state`), so a
    resumed run keeps the rounds before it and redoes the others."""

    def __init__(self, path: str | Path | None, judge: str, fraction: float):
        self.path = Path(path) if path is not None else None
        self.judge, self.fraction = judge, fraction
        self.rows: list[dict] = []
        self.warnings: list[dict] = []

    def put(self, row: dict) -> str | None:
        """Add a round's row (replacing one of the same round); the warning it raises, if any."""
        self.rows = sorted([r for r in self.rows if r["round"] != row["round"]] + [row],
                           key=lambda r: r["round"])
        self.warnings = [w for w in self.warnings if w["round"] < row["round"]]
        message = watch(self.rows)
        if message:
            self.warnings.append({"round": row["round"], "message": message})
        return message

    def state(self) -> dict:
        return json.loads(json.dumps({"rows": self.rows, "warnings": self.warnings}))

    def load(self, state: dict | None) -> None:
        self.rows = list((state or {}).get("rows", []))
        self.warnings = list((state or {}).get("warnings", []))

    def write(self) -> None:
        if self.path is None:
            return
        from rdpo.rundir import atomic_write

        atomic_write(self.path, json.dumps({
            "judge": self.judge, "fraction": self.fraction, "window": WINDOW, "climb": CLIMB,
            "follow": FOLLOW, "rounds": self.rows, "warnings": self.warnings}, indent=1) + "\n")


__all__ = ["FILE", "AuditLog", "audit_round", "audit_sample", "summarize", "watch"]
