"""Do two judges give the same verdicts, and does one judge give the same verdicts twice?

`python -m rdpo.evaluate agreement` (`rdpo.tools.evaluate`) asks two judges (any two judge
configs: a model judge, an OpenAI-compatible URL, the rule judge, or the verdicts a run
recorded) about the same responses, criterion by criterion, and reports per criterion, over the
essential and over the additional criteria:

- raw agreement: the share of verdicts both judges gave (neither unknown) that are equal;
- Cohen's kappa, the agreement beyond what the two judges' own met-rates give by chance:
  kappa = (p_o - p_e) / (1 - p_e), with p_o the raw agreement and p_e = p_a p_b +
  (1 - p_a)(1 - p_b), p_a and p_b the share of known verdicts each judge calls met
  (Cohen 1960). When p_e = 1 (both judges call everything met, or both call everything not
  met) kappa is undefined: reported as null, never as 0 or NaN;
- a bootstrap confidence interval of both, resampling prompts (a prompt's K samples share
  a rubric and an image, so they are not independent), seeded;
- each judge's unknown rate (verdicts it could not give, over all verdicts asked).

Consistency (``--consistency``): the same judge asked again with each rubric's criteria in
another order (a seeded shuffle per prompt); a verdict that changes is a flip (position bias).

Responses are deduplicated by (prompt, text): K identical samples are one judgment, not K
agreeing ones. Everything here but `judge_all` is a pure function of verdicts.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rdpo.pool import PromptRecord, Rubric

Verdicts = Mapping[str, bool | None]
KINDS = ("essential", "additional")


# -- kappa and agreement -------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """The 2x2 table of two raters' binary verdicts: ``both`` met, only ``a`` met, only ``b``
    met, ``neither`` met."""

    both: int = 0
    a: int = 0
    b: int = 0
    neither: int = 0

    @property
    def n(self) -> int:
        return self.both + self.a + self.b + self.neither

    def __add__(self, other: Table) -> Table:
        return Table(self.both + other.both, self.a + other.a, self.b + other.b,
                     self.neither + other.neither)

    @classmethod
    def of(cls, a: Sequence[bool], b: Sequence[bool]) -> Table:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} verdicts against {len(b)}")
        pairs = list(zip(a, b, strict=True))
        return cls(pairs.count((True, True)), pairs.count((True, False)),
                   pairs.count((False, True)), pairs.count((False, False)))


def raw_agreement(t: Table) -> float | None:
    """Share of equal verdicts; None for an empty table."""
    return (t.both + t.neither) / t.n if t.n else None


def kappa(t: Table) -> float | None:
    """Cohen's kappa of the table; None when undefined: an empty table, or chance agreement
    p_e = 1 (both raters gave every item the same one class)."""
    if not t.n:
        return None
    p_o = (t.both + t.neither) / t.n
    p_a, p_b = (t.both + t.a) / t.n, (t.both + t.b) / t.n
    p_e = p_a * p_b + (1 - p_a) * (1 - p_b)
    if p_e >= 1 - 1e-12:
        return None
    return (p_o - p_e) / (1 - p_e)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """`kappa` of two equally long lists of binary verdicts."""
    return kappa(Table.of(a, b))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, linear between order statistics."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def bootstrap_ci(groups: Sequence[Table], stat: Callable[[Table], float | None], *,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> list[float] | None:
    """Percentile interval of `stat` over `resamples` resamples (with replacement) of the
    `groups` (one table per prompt), seeded. Resamples where `stat` is undefined are left
    out; None when there are no groups or `stat` is undefined on every resample."""
    if not groups or resamples <= 0:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        total = Table()
        for _ in range(len(groups)):
            total += groups[rng.randrange(len(groups))]
        value = stat(total)
        if value is not None:
            values.append(value)
    if not values:
        return None
    tail = (1 - level) / 2
    return [percentile(values, tail), percentile(values, 1 - tail)]


# -- verdict pairs -------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerdictPair:
    """What two judges (or one judge twice) said about one criterion of one response."""

    prompt_id: str
    criterion: str
    """The criterion as a label: ``E · text`` or ``A · text`` (criteria with the same text on
    several prompts are one criterion, as in the run report)."""
    kind: str
    a: bool | None
    b: bool | None


def label(kind: str, text: str) -> str:
    return f"{kind[0].upper()} · {text}"


def verdict_pairs(records: Sequence[PromptRecord], a: Sequence[Verdicts],
                  b: Sequence[Verdicts]) -> list[VerdictPair]:
    """One `VerdictPair` per (response, criterion of its record's rubric); `records[i]` is
    response i's prompt. A criterion missing from a verdict dict is unknown (None)."""
    if not len(records) == len(a) == len(b):
        raise ValueError(f"{len(records)} responses, {len(a)} and {len(b)} verdict sets")
    out = []
    for record, va, vb in zip(records, a, b, strict=True):
        for kind in KINDS:
            for c in getattr(record.rubric, kind):
                out.append(VerdictPair(record.id, label(kind, c.text), kind,
                                       va.get(c.id), vb.get(c.id)))
    return out


def _tables(pairs: Sequence[VerdictPair]) -> dict[str, Table]:
    by_prompt: dict[str, list[VerdictPair]] = {}
    for p in pairs:
        by_prompt.setdefault(p.prompt_id, []).append(p)
    return {pid: Table.of([p.a for p in ps], [p.b for p in ps])
            for pid, ps in by_prompt.items()}


def _known(pairs: Sequence[VerdictPair]) -> list[VerdictPair]:
    return [p for p in pairs if p.a is not None and p.b is not None]


def _stats(pairs: Sequence[VerdictPair], resamples: int, seed: int) -> dict:
    known = _known(pairs)
    groups = list(_tables(known).values())
    total = sum(groups, Table())
    return {"verdicts": len(pairs), "both_known": len(known),
            "kappa": kappa(total),
            "kappa_ci95": bootstrap_ci(groups, kappa, resamples=resamples, seed=seed),
            "agreement": raw_agreement(total),
            "agreement_ci95": bootstrap_ci(groups, raw_agreement, resamples=resamples, seed=seed)}


def _rate(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def agreement_report(pairs: Sequence[VerdictPair], *, resamples: int = 1000,
                     seed: int = 0) -> dict:
    """kappa, raw agreement and their bootstrap 95% intervals over all criteria (top level),
    ``by_kind`` (essential, additional) and ``per_criterion`` (no interval: a criterion's
    verdicts are few); ``unknown_rate`` per judge. Agreement counts verdicts both judges gave."""
    out = _stats(pairs, resamples, seed)
    out["by_kind"] = {k: _stats([p for p in pairs if p.kind == k], resamples, seed)
                      for k in KINDS}
    per: dict[str, list[VerdictPair]] = {}
    for p in pairs:
        per.setdefault(p.criterion, []).append(p)
    out["per_criterion"] = {}
    for name, ps in sorted(per.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        known = _known(ps)
        table = Table.of([p.a for p in known], [p.b for p in known])
        out["per_criterion"][name] = {
            "kind": ps[0].kind, "verdicts": len(ps), "both_known": len(known),
            "kappa": kappa(table), "agreement": raw_agreement(table),
            "met_rate": {j: _rate([getattr(p, j) for p in ps if getattr(p, j) is not None])
                         for j in ("a", "b")},
            "unknown_rate": {j: sum(getattr(p, j) is None for p in ps) / len(ps)
                             for j in ("a", "b")}}
    out["unknown_rate"] = {j: (sum(getattr(p, j) is None for p in pairs) / len(pairs)
                               if pairs else None) for j in ("a", "b")}
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "unit": "prompt", "level": 0.95,
                        "method": "percentile"}
    return out


def flip_report(pairs: Sequence[VerdictPair], *, resamples: int = 1000, seed: int = 0) -> dict:
    """One judge asked twice (``a``: the rubric's order, ``b``: reordered): verdicts known both
    times that changed (``flips``, ``flip_rate``), verdicts known only once
    (``unknown_changed``), and the kappa between the two askings, overall and by kind."""
    def one(ps: Sequence[VerdictPair]) -> dict:
        known = _known(ps)
        flips = sum(p.a != p.b for p in known)
        return {"verdicts": len(ps), "both_known": len(known), "flips": flips,
                "flip_rate": flips / len(known) if known else None,
                "met_to_not_met": sum(p.a is True and p.b is False for p in known),
                "not_met_to_met": sum(p.a is False and p.b is True for p in known),
                "unknown_changed": sum((p.a is None) != (p.b is None) for p in ps)}

    out = one(pairs)
    stats = _stats(pairs, resamples, seed)
    out.update(kappa=stats["kappa"], kappa_ci95=stats["kappa_ci95"])
    out["by_kind"] = {k: one([p for p in pairs if p.kind == k]) for k in KINDS}
    return out


# -- reordered rubrics ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReorderedRubric(Rubric):
    """A rubric whose `criteria` come in `order` (criterion ids) instead of essential first;
    what the judge is shown changes, the criteria and their kinds do not."""

    order: tuple[str, ...] = ()

    def criteria(self):
        by_id = {c.id: c for c in self.essential + self.additional}
        return tuple(by_id[i] for i in self.order)


def reordered(record: PromptRecord, seed: int) -> PromptRecord | None:
    """`record` with its criteria in a seeded shuffle (per seed and prompt id), never the
    original order; None when the rubric has fewer than two criteria (nothing to reorder)."""
    ids = [c.id for c in record.rubric.criteria()]
    if len(ids) < 2:
        return None
    order = list(ids)
    random.Random(f"{seed}|{record.id}").shuffle(order)
    if order == ids:
        order = order[1:] + order[:1]
    rubric = ReorderedRubric(record.rubric.essential, record.rubric.additional, tuple(order))
    return dataclasses.replace(record, rubric=rubric)


# -- what the judges are asked about -------------------------------------------------------------

@dataclass(frozen=True)
class Responses:
    """The responses both judges see: `records[i]` is response i's prompt; `recorded[i]` the
    verdicts the run's judge gave it (None when they are not per-criterion verdicts)."""

    records: list[PromptRecord]
    responses: list[str]
    recorded: list[dict | None]
    source: str

    def sample(self, n: int | None, seed: int) -> Responses:
        """At most `n` of the responses (a seeded sample, in their original order)."""
        if n is None or n >= len(self.responses):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.responses)), n))
        return Responses([self.records[i] for i in keep], [self.responses[i] for i in keep],
                         [self.recorded[i] for i in keep], self.source)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per non-empty line; a line that is no JSON object is an error
    naming FILE:LINE."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not JSON ({err})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        out.append((lineno, obj))
    return out


def round_dirs(run: Path, rounds: Sequence[int] | None = None) -> list[Path]:
    """The run's complete round folders (rollouts.jsonl and pairs.jsonl present), optionally
    only `rounds`; an error naming the run when there are none or one asked for is missing."""
    found = {int(d.name): d for d in sorted((run / "rounds").glob("[0-9]*"))
             if d.name.isdigit() and (d / "rollouts.jsonl").is_file()
             and (d / "pairs.jsonl").is_file()}
    if rounds:
        missing = sorted(set(rounds) - set(found))
        if missing:
            raise ValueError(f"{run}/rounds: no complete round {missing} (has "
                             f"{sorted(found) or 'none'})")
        return [found[r] for r in sorted(set(rounds))]
    if not found:
        raise ValueError(f"{run}/rounds: no complete round (rollouts.jsonl and pairs.jsonl)")
    return [found[r] for r in sorted(found)]


def run_records(run: Path, pool: str | Path | None = None) -> dict[str, PromptRecord]:
    """The prompts of a run, by id: `pool`, else the run's ``data.train_pool``
    (run/config.yaml)."""
    from rdpo.pool import load_pool

    if pool is None:
        config = run / "config.yaml"
        if not config.is_file():
            raise ValueError(f"{config}: missing; give the pool (--pool) or a run directory")
        from omegaconf import OmegaConf

        pool = OmegaConf.select(OmegaConf.load(config), "data.train_pool")
        if not pool:
            raise ValueError(f"{config}: data.train_pool is not set; give the pool (--pool)")
    return {r.id: r for r in load_pool(pool, open_images=False)}


def responses_from_run(run: str | Path, rounds: Sequence[int] | None = None,
                       pool: str | Path | None = None) -> Responses:
    """Every distinct (prompt, response) of the run's rounds, with the verdicts the run's
    judge recorded (first occurrence)."""
    run = Path(run)
    records = run_records(run, pool)
    seen: dict[tuple[str, str], int] = {}
    out = Responses([], [], [], f"{run} rounds")
    for d in round_dirs(run, rounds):
        path = d / "rollouts.jsonl"
        for lineno, row in read_jsonl(path):
            pid, response = row.get("prompt_id"), row.get("response")
            if not isinstance(pid, str) or not isinstance(response, str):
                raise ValueError(f"{path}:{lineno}: a rollout needs prompt_id and response")
            if pid not in records:
                raise ValueError(f"{path}:{lineno}: prompt {pid!r} is not in the run's pool")
            if (pid, response) in seen:
                continue
            seen[(pid, response)] = len(out.responses)
            verdicts = row.get("verdicts")
            ids = {c.id for c in records[pid].rubric.criteria()}
            per_criterion = (isinstance(verdicts, dict) and set(verdicts) <= ids
                             and all(v is None or isinstance(v, bool) for v in verdicts.values()))
            out.records.append(records[pid])
            out.responses.append(response)
            out.recorded.append(verdicts if per_criterion else None)
    return out


def responses_from_preferences(path: str | Path) -> Responses:
    """Both responses of every record of a preference file that has a rubric
    (`rdpo.tools.preferences.load_preferences`)."""
    from rdpo.tools.preferences import load_preferences

    out = Responses([], [], [], str(path))
    for p in load_preferences(path):
        if not p.has_rubric:
            continue
        for response in dict.fromkeys(p.responses):
            out.records.append(p.record)
            out.responses.append(response)
            out.recorded.append(None)
    if not out.responses:
        raise ValueError(f"{path}: no record with a rubric: nothing to judge criterion by criterion")
    return out


class Recorded:
    """The verdicts a run's judge recorded in its rollouts.jsonl, as a judge of `agreement`."""

    name = "recorded"

    def __init__(self, responses):
        self.by_text = {(r.id, t): v for r, t, v in
                        zip(responses.records, responses.responses, responses.recorded,
                            strict=True)}

    def judge_many(self, items):
        return [[dict(self.by_text[(record.id, t)]) for t in texts] for record, texts in items]


def judge_all(judge, records: Sequence[PromptRecord], responses: Sequence[str]) -> list[dict]:
    """The judge's verdicts for every response, asked prompt by prompt in one `judge_many`
    (a remote judge sees them all at once)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.id, []).append(i)
    items = [(records[ix[0]], [responses[i] for i in ix]) for ix in groups.values()]
    out: list[dict] = [{}] * len(responses)
    for ix, verdicts in zip(groups.values(), judge.judge_many(items), strict=True):
        for i, v in zip(ix, verdicts, strict=True):
            out[i] = dict(v)
    return out
