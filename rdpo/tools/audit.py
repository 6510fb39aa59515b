"""Rubric audit: which criteria and records of a pool did a run's rounds get nothing from?

`python -m rdpo.rubrics audit POOL --run RUN` (`rdpo.tools.rubrics`) reads the round files
(rounds/NNNN/rollouts.jsonl: every response's verdicts; pairs.jsonl: kept pairs and the prompts
dropped, by reason) and reports, per criterion of a prompt's rubric:

- **never varies**: in every round, its known verdicts on the prompt's K samples are all the
  same, so it cannot separate a chosen from a rejected response (rounds where fewer than
  ``min_samples`` verdicts are known do not count either way);
- **almost always unknown**: the judge could not tell on at least ``unknown`` of its verdicts;
- **saturated**: met by at least ``saturated`` of a round's responses to its prompt (unknown
  counts as not met); per round, the share of criteria saturated shows the rubric running out
  of room as the policy improves;

and per record: the rounds it was in, the pairs it gave, and for a record that never gave a
pair, why (each round's drop reason: `rdpo.pairs.DROP_REASONS`).

When POOL is a preference file (``responses`` with a ``preferred`` one, and a ``rubric``: what
scripts/convert_vlrewardbench.py writes once rubrics are added), each record's two responses are
judged against its rubric and scored (`rdpo.judging.scoring`): the rubric discriminates when the
preferred response scores strictly higher; the records it ranks the wrong way are listed with
the criteria that decided.

`audit_run` and `discrimination` return JSON-ready dicts; `markdown` renders them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rdpo.judging.scoring import score_response
from rdpo.pool import PromptRecord
from rdpo.tools.agreement import read_jsonl, round_dirs


@dataclass(frozen=True)
class Thresholds:
    """What counts as saturated, almost always unknown, and a round where variation shows."""

    saturated: float = 0.95
    """A criterion met by at least this share of a round's responses to its prompt."""
    unknown: float = 0.9
    """A criterion whose verdicts are unknown at least this often."""
    min_samples: int = 2
    """Known verdicts a prompt needs in a round for that round to say whether a criterion varies."""


@dataclass(frozen=True)
class Round:
    """One round's files, read: the rows of rollouts.jsonl, kept prompt ids, drops by id."""

    index: int
    rows: list[dict]
    kept: list[str]
    dropped: dict[str, str]
    """prompt id -> the reason it gave no pair."""


def read_rounds(run: str | Path, rounds: Sequence[int] | None = None) -> list[Round]:
    """The run's complete rounds (`rdpo.tools.agreement.round_dirs`); a bad line is an error
    naming FILE:LINE."""
    out = []
    for d in round_dirs(Path(run), rounds):
        rows = []
        for lineno, row in read_jsonl(d / "rollouts.jsonl"):
            if not isinstance(row.get("prompt_id"), str) or not isinstance(row.get("verdicts"), dict):
                raise ValueError(f"{d / 'rollouts.jsonl'}:{lineno}: a rollout needs prompt_id "
                                 "and verdicts")
            rows.append(row)
        lines = read_jsonl(d / "pairs.jsonl")
        kept = [row["prompt_id"] for _, row in lines if "prompt_id" in row]
        summary = next((row["summary"] for _, row in lines if "summary" in row), None)
        if not isinstance(summary, dict) or not isinstance(summary.get("dropped_ids"), dict):
            raise ValueError(f"{d / 'pairs.jsonl'}: no summary line with dropped_ids")
        dropped = {pid: reason for reason, ids in summary["dropped_ids"].items() for pid in ids}
        out.append(Round(int(d.name), rows, kept, dropped))
    return out


def audit_run(records: Mapping[str, PromptRecord], rounds: Sequence[Round],
              thresholds: Thresholds = Thresholds()) -> dict:
    """The per-criterion, per-record and per-round audit of `rounds` (see the module doc).
    Verdicts that are not per-criterion (pairs.strategy outcome, rubric_holistic: one score)
    leave the criterion part empty (``one_score_rounds`` counts them)."""
    missing = sorted({row["prompt_id"] for r in rounds for row in r.rows} - set(records))
    if missing:
        raise ValueError(f"the rounds judged prompt(s) the pool lacks: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    crit: dict[tuple[str, str], dict] = {}
    per_round, one_score = [], 0
    for rnd in rounds:
        by_prompt: dict[str, list[dict]] = {}
        for row in rnd.rows:
            by_prompt.setdefault(row["prompt_id"], []).append(row["verdicts"])
        constant = saturated = judged = unknown = total = 0
        for pid, verdicts in by_prompt.items():
            rubric = records[pid].rubric
            if any(set(v) - {c.id for c in rubric.criteria()} for v in verdicts):
                one_score += 1
                continue
            for kind in ("essential", "additional"):
                for c in getattr(rubric, kind):
                    vals = [v.get(c.id) for v in verdicts]
                    known = [x for x in vals if x is not None]
                    entry = crit.setdefault((pid, c.id), {
                        "prompt_id": pid, "criterion": c.id, "kind": kind, "text": c.text,
                        "verdicts": 0, "met": 0, "unknown": 0, "rounds": [],
                        "constant_rounds": [], "saturated_rounds": [], "values": []})
                    entry["verdicts"] += len(vals)
                    entry["met"] += sum(x is True for x in vals)
                    entry["unknown"] += len(vals) - len(known)
                    entry["rounds"].append(rnd.index)
                    judged += 1
                    unknown += len(vals) - len(known)
                    total += len(vals)
                    if len(known) >= thresholds.min_samples and len(set(known)) == 1:
                        entry["constant_rounds"].append(rnd.index)
                        entry["values"].append(known[0])
                        constant += 1
                    elif len(known) >= thresholds.min_samples:
                        entry["values"].append(None)
                    if vals and sum(x is True for x in vals) / len(vals) >= thresholds.saturated:
                        entry["saturated_rounds"].append(rnd.index)
                        saturated += 1
        per_round.append({
            "round": rnd.index, "prompts": len(by_prompt), "responses": len(rnd.rows),
            "pairs": len(rnd.kept), "dropped": _count(rnd.dropped.values()),
            "criteria": judged, "unknown_rate": unknown / total if total else None,
            "constant": constant, "constant_share": constant / judged if judged else None,
            "saturated": saturated, "saturated_share": saturated / judged if judged else None})
    criteria = [_criterion(e, thresholds) for e in crit.values()]
    return {"thresholds": asdict(thresholds), "rounds": per_round, "one_score_rounds": one_score,
            "criteria": criteria,
            "summary": {"criteria": len(criteria),
                        "never_varies": sum(c["never_varies"] for c in criteria),
                        "mostly_unknown": sum(c["mostly_unknown"] for c in criteria),
                        "saturated": sum(bool(c["saturated_rounds"]) for c in criteria)},
            "records": _records(records, rounds, criteria)}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _criterion(e: dict, t: Thresholds) -> dict:
    values = e.pop("values")
    shown = [v for v in values if v is not None]
    # Rounds that could tell (enough known verdicts) all showed one value, possibly a different
    # one in each round: no round could have split a pair on it.
    never = bool(values) and len(shown) == len(values)
    e["never_varies"] = never
    e["stuck_at"] = (None if not never else "met" if all(shown)
                     else "not met" if not any(shown) else "per round")
    e["unknown_rate"] = e["unknown"] / e["verdicts"] if e["verdicts"] else None
    e["mostly_unknown"] = e["verdicts"] > 0 and e["unknown"] / e["verdicts"] >= t.unknown
    return e


def _records(records: Mapping[str, PromptRecord], rounds: Sequence[Round],
             criteria: Sequence[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for rnd in rounds:
        for pid in dict.fromkeys(row["prompt_id"] for row in rnd.rows):
            r = seen.setdefault(pid, {"prompt_id": pid, "rounds": 0, "pairs": 0, "drops": {}})
            r["rounds"] += 1
            r["pairs"] += pid in rnd.kept
            if pid in rnd.dropped:
                r["drops"][str(rnd.index)] = rnd.dropped[pid]
    frozen: dict[str, int] = {}
    for c in criteria:
        frozen[c["prompt_id"]] = frozen.get(c["prompt_id"], 0) + c["never_varies"]
    out = []
    for pid, r in seen.items():
        r["never_paired"] = r["pairs"] == 0
        r["drop_reasons"] = _count(r["drops"].values())
        r["criteria"] = len(records[pid].rubric.criteria())
        r["criteria_never_vary"] = frozen.get(pid, 0)
        out.append(r)
    return sorted(out, key=lambda r: (not r["never_paired"], r["pairs"], r["prompt_id"]))


# -- discrimination on reference responses with a known preference --------------------------------

def discrimination(judge, pairs: Sequence, aggregation: str = "lexicographic") -> dict:
    """Whether each preference pair's rubric (judged by `judge`) scores the preferred response
    strictly higher: ``right``, ``wrong``, ``tie``, or ``unknown`` (an essential verdict
    unknown: its score could hide a failed essential criterion, as in pair selection). `pairs`:
    `rdpo.tools.preferences.PreferencePair` with rubrics. ``wrong`` lists the pairs ranked the
    wrong way, each with both scores and the criteria whose verdicts differ."""
    pairs = [p for p in pairs if p.has_rubric]
    verdicts = judge.judge_many([(p.record, p.responses) for p in pairs]) if pairs else []
    outcome: dict[str, int] = dict.fromkeys(("right", "wrong", "tie", "unknown"), 0)
    wrong = []
    for p, vs in zip(pairs, verdicts, strict=True):
        scores = [score_response(p.record.rubric, v, aggregation) for v in vs]
        good, bad = scores[p.preferred], scores[1 - p.preferred]
        if good.unknown_essential or bad.unknown_essential:
            kind = "unknown"
        elif abs(good.value - bad.value) < 1e-9:
            kind = "tie"
        else:
            kind = "right" if good.value > bad.value else "wrong"
        outcome[kind] += 1
        if kind == "wrong":
            pv, rv = vs[p.preferred], vs[1 - p.preferred]
            wrong.append({"id": p.record.id, "preferred_score": good.value,
                          "other_score": bad.value,
                          "deciding": [{"criterion": c.id, "text": c.text,
                                        "preferred": pv.get(c.id), "other": rv.get(c.id)}
                                       for c in p.record.rubric.criteria()
                                       if pv.get(c.id) != rv.get(c.id)]})
    n = len(pairs)
    return {"pairs": n, **outcome, "accuracy": outcome["right"] / n if n else None,
            "aggregation": aggregation, "wrong_records": wrong}


# -- Markdown ------------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(head: Sequence[str], rows: list[Sequence], top: int) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows[:top]]
    if len(rows) > top:
        out.append(f"\n… and {len(rows) - top} more (all of them in audit.json).")
    return out


def markdown(result: dict, top: int = 20) -> str:
    """The audit as a Markdown page: per round, then each finding with its table (the first
    `top` rows; the JSON has all)."""
    out = [f"# Rubric audit: {result.get('pool', 'pool')}", ""]
    t = result.get("thresholds", {})
    run = result.get("run")
    if run:
        s = run["summary"]
        out += [f"Run `{result.get('run_dir')}`: {len(run['rounds'])} round(s), "
                f"{len(run['records'])} prompts, {s['criteria']} criteria judged. Thresholds: "
                f"saturated ≥ {t['saturated']:.0%} met, almost always unknown ≥ {t['unknown']:.0%}, "
                f"variation needs ≥ {t['min_samples']} known verdicts.", "", "## Per round", ""]
        out += _table(["round", "prompts", "responses", "pairs", "drops", "unknown verdicts",
                       "criteria constant over K samples", "saturated criteria"],
                      [[r["round"], r["prompts"], r["responses"], r["pairs"],
                        ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) or "none",
                        _pct(r["unknown_rate"]), f"{r['constant']} ({_pct(r['constant_share'])})",
                        f"{r['saturated']} ({_pct(r['saturated_share'])})"] for r in run["rounds"]],
                      10**6)
        if run["one_score_rounds"]:
            out += ["", f"{run['one_score_rounds']} prompt-round(s) hold one score per response "
                    "(pairs.strategy outcome or rubric_holistic), not per-criterion verdicts: "
                    "left out of the criterion findings."]
        crits = run["criteria"]

        def rows(cs, extra):
            return [[c["prompt_id"], f"{c['criterion']} · {c['text']}", c["kind"], *extra(c)]
                    for c in cs]

        never = [c for c in crits if c["never_varies"]]
        out += ["", f"## Criteria that never vary across a prompt's samples: {len(never)} of "
                f"{len(crits)}", "", "They cannot separate a chosen from a rejected response.", ""]
        out += _table(["prompt", "criterion", "kind", "rounds", "stuck at"],
                      rows(never, lambda c: [len(c["rounds"]), c["stuck_at"]]), top)
        unknown = sorted((c for c in crits if c["mostly_unknown"]), key=lambda c: -c["unknown_rate"])
        out += ["", f"## Criteria almost always unknown: {len(unknown)}", ""]
        out += _table(["prompt", "criterion", "kind", "unknown", "verdicts"],
                      rows(unknown, lambda c: [_pct(c["unknown_rate"]), c["verdicts"]]), top)
        sat = sorted((c for c in crits if c["saturated_rounds"]),
                     key=lambda c: (-len(c["saturated_rounds"]), c["prompt_id"]))
        out += ["", f"## Saturated criteria: {len(sat)}", "",
                "Met by nearly every response of a round to their prompt.", ""]
        out += _table(["prompt", "criterion", "kind", "saturated in rounds"],
                      rows(sat, lambda c: [", ".join(map(str, c["saturated_rounds"]))]), top)
        unpaired = [r for r in run["records"] if r["never_paired"]]
        reasons = _count(v for r in unpaired for v in r["drops"].values())
        out += ["", f"## Records that never yield a pair: {len(unpaired)} of {len(run['records'])}",
                "", "Drops over their rounds: " + (", ".join(f"{k} {v}" for k, v in reasons.items())
                                                   or "none") + ".", ""]
        out += _table(["prompt", "rounds", "drop reasons", "criteria that never vary"],
                      [[r["prompt_id"], r["rounds"],
                        ", ".join(f"{k} {v}" for k, v in r["drop_reasons"].items()),
                        f"{r['criteria_never_vary']} of {r['criteria']}"] for r in unpaired], top)
    d = result.get("discrimination")
    if d:
        out += ["", "## Discrimination on reference responses", "",
                f"{d['pairs']} records with a known preference, judged by {result.get('judge')}: "
                f"the rubric ranks {d['right']} the right way ({_pct(d['accuracy'])}), "
                f"{d['wrong']} the wrong way, {d['tie']} tied, {d['unknown']} unknown "
                f"(an essential verdict unknown; {d['aggregation']} score).", ""]
        out += _table(["record", "preferred score", "other score", "criteria that decided"],
                      [[w["id"], f"{w['preferred_score']:.3f}", f"{w['other_score']:.3f}",
                        "; ".join(f"{c['criterion']} (preferred {c['preferred']}, other "
                                  f"{c['other']})" for c in w["deciding"])]
                       for w in d["wrong_records"]], top)
    return "\n".join(out) + "\n"
