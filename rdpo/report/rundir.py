"""Reading a run directory back: per-round numbers, step metrics, held-out evaluation, what the
rounds cost (cost.json) and the audit judge's watch (judge_audit.json).

Works on a run that is still going: a round counts once its ``pairs.jsonl`` ends with the
summary line (written last), and a half-written last line of ``metrics.csv`` is skipped. Bad
content anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class RoundStats:
    """One round over all ranks: score, pass rate, pairs and drops, per-criterion counts."""

    index: int
    step: int
    prompts: int
    responses: int
    mean_score: float
    essential_pass_rate: float
    unknown_verdicts: int
    kept: int
    dropped: dict[str, int]
    criteria: dict[str, tuple[int, int]]
    """Criterion label → (met, judged); unknown verdicts are in neither count."""


@dataclass
class RunData:
    """What a run directory holds so far."""

    name: str
    path: Path
    config: dict = field(default_factory=dict)
    rounds: list[RoundStats] = field(default_factory=list)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """metrics.csv column → [(step, value)] of its non-empty cells."""
    eval: dict = field(default_factory=dict)
    last_step: int | None = None
    cost: dict = field(default_factory=dict)
    """cost.json (`rdpo.cost`); {} for a run without one."""
    audit: dict = field(default_factory=dict)
    """judge_audit.json (`rdpo.judging.audit`); {} without an audit judge."""
    audit_criteria: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """Round → criterion label → (met, judged) of the audit judge's verdicts on the audited
    responses (rounds/NNNN/judge_audit.json)."""

    @property
    def strategy(self) -> str:
        """What the rounds scored pairs with: rubric, or outcome (one holistic verdict)."""
        return (self.config.get("pairs") or {}).get("strategy") or "rubric"

    def metric(self, name: str) -> list[tuple[int, float]]:
        """A step metric by its logged name (Lightning's ``_step`` variant when there is one)."""
        return self.series.get(f"{name}_step") or self.series.get(name) or []


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; bad JSON names the file and line."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return out


def _criterion_labels(pool: str | None) -> dict[str, dict[str, str]]:
    """prompt id → {criterion id: "E · text" / "A · text"}; {} when the pool is not readable."""
    if not pool or not Path(pool).is_file():
        return {}
    labels = {}
    for _, record in read_jsonl(Path(pool)):
        rubric = record.get("rubric", {})
        labels[record.get("id")] = {c["id"]: f"{kind[0].upper()} · {c.get('text', c['id'])}"
                                    for kind in ("essential", "additional")
                                    for c in rubric.get(kind, [])}
    return labels


def _round_parts(directory: Path) -> list[Path] | None:
    """The folder of one round's files (every rank's, written once by rank 0) in a list; None
    while it is being written."""
    pairs = directory / "pairs.jsonl"
    if not (directory / "rollouts.jsonl").is_file() or not pairs.is_file():
        return None
    lines = pairs.read_text().rstrip("\n").rsplit("\n", 1)
    return [directory] if lines[-1].startswith('{"summary"') else None


def read_round(directory: Path, index: int, step: int,
               labels: dict[str, dict[str, str]]) -> RoundStats | None:
    """One round's numbers from its files (summed over ranks); None if it is not complete."""
    parts = _round_parts(directory)
    if parts is None:
        return None
    responses = score_sum = passed = unknown = kept = prompts = 0
    dropped: dict[str, int] = {}
    criteria: dict[str, list[int]] = {}
    for part in parts:
        path = part / "rollouts.jsonl"
        for lineno, row in read_jsonl(path):
            try:
                score, verdicts = float(row["score"]), row["verdicts"]
                passed += row["essential_pass"] is True
                unknown += int(row.get("unknown", 0))
                names = labels.get(row["prompt_id"], {})
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: bad rollout record ({e!r})") from None
            responses += 1
            score_sum += score
            for cid, met in verdicts.items():
                if not isinstance(met, bool):
                    # None: unknown, neither met nor failed; a number: an outcome-mode score
                    # (pairs.strategy=outcome), which has no criteria to count.
                    continue
                counts = criteria.setdefault(names.get(cid, cid), [0, 0])
                counts[0] += met is True
                counts[1] += 1
        path = part / "pairs.jsonl"
        lineno, last = read_jsonl(path)[-1]
        try:
            summary = last["summary"]
            prompts += int(summary["prompts"])
            kept += int(summary["kept"])
            for reason, n in summary["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + int(n)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: bad summary line ({e!r})") from None
    n = max(1, responses)
    return RoundStats(index, step, prompts, responses, score_sum / n, passed / n, unknown, kept,
                      dropped, {k: (v[0], v[1]) for k, v in criteria.items()})


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as column → [(step, value)]; a half-written last line is skipped."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float]]] = {}
    for i, row in enumerate(rows):
        lineno = i + 2  # after the header
        try:
            step = int(float(row["step"]))
            values = {k: float(v) for k, v in row.items()
                      if k not in ("step", "epoch") and k is not None and v not in ("", None)}
        except (KeyError, TypeError, ValueError) as e:
            if i == len(rows) - 1:
                break  # the logger may be rewriting the file right now
            raise ValueError(f"{path}:{lineno}: bad metrics row ({e!r})") from None
        for key, value in values.items():
            if math.isfinite(value):
                series.setdefault(key, []).append((step, value))
    return series


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Everything a run directory holds so far (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    config_file, rounds_dir = path / "config.yaml", path / "rounds"
    metrics_file = path / "logs" / "metrics.csv"
    if not (config_file.is_file() or rounds_dir.is_dir() or metrics_file.is_file()):
        raise ValueError(f"{path}: not an rdpo run directory (no config.yaml, rounds/ or "
                         "logs/metrics.csv)")
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a mapping of config sections")
    every = (config.get("rollout") or {}).get("every_n_steps") or 1
    labels = _criterion_labels((config.get("data") or {}).get("train_pool"))
    rounds = []
    for directory in sorted(rounds_dir.glob("[0-9]*")) if rounds_dir.is_dir() else []:
        if directory.name.isdigit():
            # Rounds are periodic in optimizer steps: round r begins at step r × every_n_steps.
            index = int(directory.name)
            stats = read_round(directory, index, index * every, labels)
            if stats is not None:
                rounds.append(stats)
    series = read_metrics(metrics_file)
    results = read_json(path / "eval.json")
    audit_criteria = {r.index: read_audit_criteria(rounds_dir / f"{r.index:04d}", labels)
                      for r in rounds}
    # The last training step: held-out results and a round's training seconds (logged when its
    # steps end) land at the step after the last one.
    after = ("heldout/", "round/cost/seconds/training")
    steps = [s for name, points in series.items() if not name.startswith(after)
             for s, _ in points] + [r.step for r in rounds]
    return RunData(name or path.name, path, config, rounds, series, results,
                   max(steps) if steps else None, read_json(path / "cost.json"),
                   read_json(path / "judge_audit.json"),
                   {i: c for i, c in audit_criteria.items() if c})


def read_json(path: Path) -> dict:
    """A JSON file's object; {} when there is none; bad JSON names the file and line."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_audit_criteria(directory: Path, labels: dict[str, dict[str, str]]
                        ) -> dict[str, tuple[int, int]]:
    """Criterion label → (met, judged) of a round's audited responses, by the audit judge."""
    counts: dict[str, list[int]] = {}
    for pair in read_json(directory / "judge_audit.json").get("audited", []):
        names = labels.get(pair.get("prompt_id"), {})
        for verdicts in pair.get("audit_verdicts", []):
            for cid, met in verdicts.items():
                if isinstance(met, bool):
                    c = counts.setdefault(names.get(cid, cid), [0, 0])
                    c[0] += met
                    c[1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}
