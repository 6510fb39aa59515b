"""The report figure: ten panels, every run in its own colour on shared axes.

Drawn on a bare `matplotlib.figure.Figure` (no pyplot state, no GUI backend), so it is safe to
call from inside a training process.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from rdpo.report.rundir import RunData

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]
REASON_MARKERS = ["x", "^", "v", "s", "D", "P", "*"]
TOP_CRITERIA = 10


def _rolling(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _empty(ax, text: str = "no data yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def _after_step(run: RunData) -> int | None:
    return (run.config.get("dpo") or {}).get("max_steps") or run.last_step


def _score_panel(ax, runs: list[RunData], key: str, eval_key: str, title: str) -> None:
    drawn = False
    for color, run in zip(COLORS, runs, strict=False):
        # One-score rounds (outcome, rubric_holistic) have no essential verdicts (every known
        # score passes them vacuously): their round pass rate says nothing, only the held-out one does.
        vacuous = key == "essential_pass_rate" and run.strategy != "rubric"
        if run.rounds and not vacuous:
            ax.plot([r.step for r in run.rounds], [getattr(r, key) for r in run.rounds], "o-",
                    color=color, ms=4, lw=1.5)
            drawn = True
        # held-out (eval.json): before (step 0) and after (last step)
        points = []
        if "before" in run.eval:
            points = [(0, run.eval["before"][eval_key])]
        if "after" in run.eval and _after_step(run) is not None:
            points = points + [(_after_step(run), run.eval["after"][eval_key])]
        if points:
            ax.plot(*zip(*sorted(points), strict=True), "*--", color=color, ms=11, lw=1.2)
            drawn = True
    if not drawn:
        _empty(ax)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(handles=[Line2D([], [], color="0.3", marker="o", ms=4,
                              label="rounds (training prompts, the score pairs were built from)"),
                       Line2D([], [], color="0.3", marker="*", ms=10, ls="--",
                              label="held-out evaluation (rubric)")],
              loc="lower right", fontsize=8)


def _pairs_panel(ax, runs: list[RunData]) -> None:
    reasons = sorted({k for run in runs for r in run.rounds for k, v in r.dropped.items() if v})
    if not any(run.rounds for run in runs):
        _empty(ax)
    elif len(runs) == 1:
        # One run: stacked bars, kept at the bottom, each drop reason on top.
        rounds = runs[0].rounds
        x = [r.index for r in rounds]
        bottom = [r.kept for r in rounds]
        ax.bar(x, bottom, color=COLORS[2], label="kept (pairs)")
        palette = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#bcbd22", "#17becf"]
        for color, reason in zip(palette, reasons, strict=False):
            counts = [r.dropped.get(reason, 0) for r in rounds]
            ax.bar(x, counts, bottom=bottom, color=color, label=f"dropped: {reason}")
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.legend(fontsize=8, loc="upper center", ncols=2)
    else:
        for color, run in zip(COLORS, runs, strict=False):
            x = [r.index for r in run.rounds]
            ax.plot(x, [r.kept for r in run.rounds], "o-", color=color, ms=4)
            for marker, reason in zip(REASON_MARKERS, reasons, strict=False):
                ax.plot(x, [r.dropped.get(reason, 0) for r in run.rounds], ls=":", marker=marker,
                        color=color, ms=5, lw=1)
        handles = [Line2D([], [], color="0.3", marker="o", ms=4, label="kept (pairs)")]
        handles += [Line2D([], [], color="0.3", marker=m, ls=":", label=f"dropped: {reason}")
                    for m, reason in zip(REASON_MARKERS, reasons, strict=False)]
        ax.legend(handles=handles, fontsize=8, loc="upper center", ncols=2)
    totals = [r.prompts for run in runs for r in run.rounds]
    if totals:
        ax.set_ylim(0, 1.35 * max(totals))  # headroom for the legend
    ax.set_title("Prompts per round: pair kept, or why dropped")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3, axis="y")


def _unknown_panel(ax, runs: list[RunData]) -> None:
    for color, run in zip(COLORS, runs, strict=False):
        ax.plot([r.index for r in run.rounds], [r.unknown_verdicts for r in run.rounds], "o-",
                color=color, ms=4)
    if not any(run.rounds for run in runs):
        _empty(ax)
    elif not any(r.unknown_verdicts for run in runs for r in run.rounds):
        ax.text(0.5, 0.6, "no unknown verdicts", ha="center", transform=ax.transAxes, color="0.4")
    ax.set_title("Unknown verdicts per round (judge could not tell)")
    ax.set_xlabel("round")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _step_panel(ax, runs: list[RunData], name: str, title: str, reference: float | None) -> None:
    drawn = False
    for color, run in zip(COLORS, runs, strict=False):
        points = run.metric(name)
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        # Per-step values are noisy (a batch of a few pairs): the raw line is faint, a rolling
        # mean over ~1/20 of the run is drawn on top.
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, _rolling(list(values), max(1, len(values) // 20)), color=color, lw=1.6)
        drawn = True
    if not drawn:
        _empty(ax)
    if reference is not None:
        ax.axhline(reference, color="0.5", lw=0.8, ls="--")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)


def _criteria_panel(ax, runs: list[RunData], moves: list[tuple[str, list]]) -> None:
    best: dict[str, float] = {}
    for _, run_moves in moves:
        for m in run_moves:
            best[m.text] = max(best.get(m.text, 0.0), abs(m.z))
    texts = sorted(best, key=lambda t: (-best[t], t))[:TOP_CRITERIA]
    if not texts:
        outcome = all(run.strategy != "rubric" for run in runs)
        _empty(ax, "one-score rounds: one holistic verdict per response, no criteria" if outcome
               else "no criterion judged often enough yet")
        ax.set_axis_off()
        return
    step = 0.8 / max(1, len(runs))
    for k, (color, (_, run_moves)) in enumerate(zip(COLORS, moves, strict=False)):
        by_text = {m.text: m for m in run_moves}
        for row, text in enumerate(texts):
            if text not in by_text:
                continue
            m, y = by_text[text], row + (k - (len(runs) - 1) / 2) * step
            ax.annotate("", (m.after, y), (m.before, y),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1.8})
            ax.plot([m.before], [y], "o", mfc="white", mec=color, ms=6)
            ax.plot([m.after], [y], "o", color=color, ms=6)
    ax.set_yticks(range(len(texts)), [textwrap.shorten(t, 70) for t in texts], fontsize=8)
    ax.set_ylim(len(texts) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("pass rate (unknown verdicts left out)")
    sources = sorted({source for source, _ in moves})
    ax.set_title(f"Criteria that moved most: before (open) → after (filled); {'; '.join(sources)}")
    ax.grid(alpha=0.3, axis="x")


PHASE_COLORS = {"sampling": "#1f77b4", "judging": "#ff7f0e", "reference": "#2ca02c",
                "audit": "#9467bd", "training": "#7f7f7f"}


def _cost_panel(ax, runs: list[RunData]) -> None:
    """Where a round's time goes: one run, a stacked bar of its phases' seconds per round;
    several, each run's round seconds (phases summed) and its judging seconds (dotted)."""
    rows = [run.cost.get("rounds", []) for run in runs]
    if not any(rows):
        _empty(ax, "no cost.json")
    elif len(runs) == 1:
        x, bottom = [r["round"] for r in rows[0]], [0.0] * len(rows[0])
        for phase, color in PHASE_COLORS.items():
            values = [r["seconds"].get(phase, 0.0) for r in rows[0]]
            ax.bar(x, values, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.legend(fontsize=8, loc="upper right")
    else:
        for color, run_rows in zip(COLORS, rows, strict=False):
            x = [r["round"] for r in run_rows]
            ax.plot(x, [sum(r["seconds"].values()) for r in run_rows], "o-", color=color, ms=4)
            ax.plot(x, [r["seconds"].get("judging", 0.0) for r in run_rows], ":", color=color)
        ax.legend(handles=[Line2D([], [], color="0.3", marker="o", label="all phases"),
                           Line2D([], [], color="0.3", ls=":", label="judging")], fontsize=8)
    ax.set_title("Seconds per round, by phase (phases of a pipelined round overlap)")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3, axis="y")


def _tokens_panel(ax, runs: list[RunData]) -> None:
    """Where a round's tokens go: sampled by the policy, and the judges' prompt + completion."""
    drawn = False
    for color, run in zip(COLORS, runs, strict=False):
        rows = run.cost.get("rounds", [])
        if not rows:
            continue
        x = [r["round"] for r in rows]
        ax.plot(x, [r["sampled_tokens"] for r in rows], "o-", color=color, ms=4)
        ax.plot(x, [r["judge_prompt_tokens"] + r["judge_completion_tokens"] for r in rows],
                "s--", color=color, ms=4)
        if any(r["audit_prompt_tokens"] for r in rows):
            ax.plot(x, [r["audit_prompt_tokens"] + r["audit_completion_tokens"] for r in rows],
                    "^:", color=color, ms=4)
        drawn = True
    if not drawn:
        _empty(ax, "no cost.json")
    ax.legend(handles=[Line2D([], [], color="0.3", marker="o", label="sampled by the policy"),
                       Line2D([], [], color="0.3", marker="s", ls="--",
                              label="judge (prompt + completion)"),
                       Line2D([], [], color="0.3", marker="^", ls=":", label="audit judge")],
              fontsize=8, loc="upper right")
    ax.set_title("Tokens per round")
    ax.set_xlabel("round")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def _audit_panel(ax, runs: list[RunData]) -> None:
    """The audit judge's watch: both judges' chosen − rejected margins on the audited pairs,
    and how often the audit judge agrees on the order."""
    drawn = False
    for color, run in zip(COLORS, runs, strict=False):
        rows = [r for r in run.audit.get("rounds", []) if r.get("pairs")]
        if not rows:
            continue
        x = [r["round"] for r in rows]
        ax.plot(x, [r["train_margin"] for r in rows], "o-", color=color, ms=4)
        ax.plot(x, [r["audit_margin"] for r in rows], "s--", color=color, ms=4)
        ax.plot(x, [r["pair_agreement"] for r in rows], ":", color=color, lw=1)
        for w in run.audit.get("warnings", []):
            ax.axvline(w["round"], color=color, lw=0.8, ls="-.")
        drawn = True
    if not drawn:
        _empty(ax, "no audit judge (judge.audit)")
    ax.legend(handles=[Line2D([], [], color="0.3", marker="o", label="training judge margin"),
                       Line2D([], [], color="0.3", marker="s", ls="--", label="audit judge margin"),
                       Line2D([], [], color="0.3", ls=":", label="pair agreement"),
                       Line2D([], [], color="0.3", ls="-.", label="watch warning")],
              fontsize=8, loc="lower left")
    ax.set_title("Audit judge: chosen − rejected score on audited pairs")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def plot_runs(runs: list[RunData], moves: list[tuple[str, list]], png: Path) -> None:
    """Write the report figure for `runs` (overlaid, one colour each) to `png`."""
    fig = Figure(figsize=(18, 20), dpi=100, layout="constrained")
    # Two sub-figures, so the long criterion labels below do not squeeze the panels above.
    top, bottom = fig.subfigures(2, 1, height_ratios=[3, 1.25])
    axes = top.subplots(3, 3).ravel()
    _score_panel(axes[0], runs, "mean_score", "rubric_score", "Mean score")
    _score_panel(axes[1], runs, "essential_pass_rate", "essential_pass_rate",
                 "Essential pass rate (all essential criteria met)")
    _pairs_panel(axes[2], runs)
    _unknown_panel(axes[3], runs)
    _step_panel(axes[4], runs, "train/rewards/margins", "DPO reward margin (chosen − rejected)", 0.0)
    _step_panel(axes[5], runs, "train/rewards/accuracy", "DPO reward accuracy", 0.5)
    _cost_panel(axes[6], runs)
    _tokens_panel(axes[7], runs)
    _audit_panel(axes[8], runs)
    for ax in (*axes[2:4], *axes[6:9]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _criteria_panel(bottom.subplots(), runs, moves)
    top.suptitle("rdpo run report: " + ", ".join(run.name for run in runs), fontsize=15)
    mixed = any(run.strategy != "rubric" for run in runs)
    bottom.legend(handles=[Line2D([], [], color=c, lw=3,
                                  label=f"{run.name} (pairs: {run.strategy})" if mixed else run.name)
                           for c, run in zip(COLORS, runs, strict=False)],
                  loc="outside lower center", ncols=min(len(runs), 6), fontsize=11)
    fig.savefig(png)
