"""Run reports: a PNG of plots and a Markdown summary of one or several run directories.

    python -m rdpo.report RUN_DIR [RUN_DIR ...] [--out FILE]

Reads whatever a run has written so far (a run still going, or one with a single round):
``rounds/NNNN/{rollouts,pairs}.jsonl`` for the per-round numbers, ``logs/metrics.csv`` for the
DPO step metrics, ``eval.json`` for the held-out evaluation, ``cost.json`` for what the rounds
cost and ``judge_audit.json`` for the audit judge's watch (`rdpo.report.tables`). Several runs overlay on the
same axes. `--out` names the files (``FILE.png`` and ``FILE.md``); by default they are
``RUN_DIR/report.{png,md}`` for one run and ``report.{png,md}`` here for several.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rdpo.report.rundir import RoundStats, RunData, load_run
from rdpo.report.tables import audit_table, cost_table, drift_table

TOP_CRITERIA = 10
MIN_JUDGED = 10  # a criterion judged fewer times than this (in either round) is too noisy to rank


@dataclass(frozen=True)
class CriterionMove:
    """One criterion's pass rate before and after (unknown verdicts left out of both)."""

    text: str
    before: float
    after: float
    judged_before: int
    judged_after: int

    @property
    def change(self) -> float:
        return self.after - self.before

    @property
    def z(self) -> float:
        """Two-proportion z statistic of the change: ranks a well-supported move above a big
        one seen on a single prompt's few samples."""
        n0, n1 = self.judged_before, self.judged_after
        pooled = (self.before * n0 + self.after * n1) / (n0 + n1)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
        return self.change / se if se > 0 else 0.0


@dataclass(frozen=True)
class ReportResult:
    """The files written and the runs they describe."""

    png: Path
    markdown: Path
    runs: list[RunData] = field(default_factory=list)


def criterion_moves(run: RunData, top: int | None = TOP_CRITERIA,
                    min_judged: int = MIN_JUDGED) -> tuple[str, list[CriterionMove]]:
    """(where the numbers come from, the criteria whose pass rate moved most, surest first).

    Held-out per-criterion counts from ``eval.json`` when the evaluation recorded them, else the
    first and the last round on the training prompts.
    """
    held = [run.eval.get(side, {}).get("criteria") for side in ("before", "after")]
    if all(held):
        source, (first, last) = "held-out, before vs after", held
    elif run.rounds:
        first, last = run.rounds[0].criteria, run.rounds[-1].criteria
        source = f"training prompts, round {run.rounds[0].index} vs round {run.rounds[-1].index}"
    else:
        return "no round yet", []
    moves = []
    for text in first.keys() & last.keys():
        (met0, n0), (met1, n1) = first[text], last[text]
        if n0 >= min_judged and n1 >= min_judged:
            moves.append(CriterionMove(text, met0 / n0, met1 / n1, n0, n1))
    moves.sort(key=lambda m: (-abs(m.z), -abs(m.change), m.text))
    return source, moves[:top]


def _default_out(run_dirs: list[Path]) -> Path:
    return run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report")


def write_report(run_dirs, out: str | Path | None = None) -> ReportResult:
    """Render ``OUT.png`` and ``OUT.md`` for the runs in `run_dirs` (see the module docstring)."""
    from rdpo.report.plot import plot_runs

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("write_report: no run directory given")
    runs = load_runs(run_dirs)
    out = Path(out) if out is not None else _default_out(run_dirs)
    if out.suffix in (".png", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    png, markdown = out.with_name(out.name + ".png"), out.with_name(out.name + ".md")
    moves = [criterion_moves(run, top=None) for run in runs]
    plot_runs(runs, moves, png)
    markdown.write_text(render_markdown(runs, moves, png.name))
    return ReportResult(png, markdown, runs)


def load_runs(run_dirs: list[Path]) -> list[RunData]:
    """Every run, named by its directory (parent folders added until the names differ)."""
    paths = [d.resolve() for d in run_dirs]
    depth = 1
    while depth < 6:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            break
        depth += 1
    return [load_run(d, name) for d, name in zip(run_dirs, names, strict=True)]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _before_after(run: RunData, key: str, fmt) -> str:
    before, after = (run.eval.get(side, {}).get(key) for side in ("before", "after"))
    if before is None:
        return "–"
    if after is None:
        return f"{fmt(before)} → (running)"
    return f"{fmt(before)} → {fmt(after)}"


def _drops(rounds: list[RoundStats]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in rounds:
        for reason, n in r.dropped.items():
            total[reason] = total.get(reason, 0) + n
    return total


def render_markdown(runs: list[RunData], moves: list[tuple[str, list[CriterionMove]]],
                    png_name: str) -> str:
    """The summary: one row per run, then per run the drop reasons and the criteria that moved."""
    out = ["# rdpo run report", "", f"![run report]({png_name})", "",
           "| run | pairs from | rounds | last step | held-out rubric score | held-out essential pass "
           "| last round score | last round essential pass | pairs kept | unknown verdicts |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        last = run.rounds[-1] if run.rounds else None
        kept = sum(r.kept for r in run.rounds)
        prompts = sum(r.prompts for r in run.rounds)
        out.append(
            f"| {run.name} | {run.strategy} | {len(run.rounds)} | {run.last_step if run.last_step is not None else '–'} "
            f"| {_before_after(run, 'rubric_score', _num)} "
            f"| {_before_after(run, 'essential_pass_rate', _pct)} "
            f"| {_num(last.mean_score if last else None)} "
            f"| {_pct(last.essential_pass_rate if last and run.strategy == 'rubric' else None)} "
            f"| {kept}/{prompts} | {sum(r.unknown_verdicts for r in run.rounds)} |")
    for run, (source, run_moves) in zip(runs, moves, strict=True):
        out += ["", f"## {run.name}", ""]
        if not run.rounds:
            out += ["No round written yet.", ""]
            continue
        drops = {k: v for k, v in _drops(run.rounds).items() if v}
        out.append("Prompts dropped (no pair), by reason: "
                   + (", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]))
                      if drops else "none") + ".")
        out += cost_table(run) + audit_table(run) + drift_table(run, MIN_JUDGED)
        if not run_moves:
            out.append(f"\n{run.strategy} rounds judge one holistic verdict per response: no "
                       "per-criterion pass rates." if run.strategy != "rubric" else
                       f"\nNo criterion judged at least {MIN_JUDGED} times in both rounds yet.")
            continue
        out += ["", f"Criteria whose pass rate moved most ({source}):", "",
                "| criterion | before | after | change | judged (before, after) |",
                "|---|---|---|---|---|"]
        for m in run_moves[:TOP_CRITERIA]:
            out.append(f"| {m.text.replace('|', chr(92) + '|')} | {_pct(m.before)} "
                       f"| {_pct(m.after)} | {100 * m.change:+.1f} pts "
                       f"| {m.judged_before}, {m.judged_after} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdpo.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    parser.add_argument("--out", help="output path without suffix (writes OUT.png and OUT.md)")
    args = parser.parse_args(argv)
    try:
        result = write_report(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.png} and {result.markdown}")
    return 0
