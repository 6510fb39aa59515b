"""The ablation: base policy vs outcome-based vs rubric-based filtering, equal compute.

    python -m rdpo.ablation [--config configs/quickstart.yaml] [--seeds 0 1 2]
                            [--out runs/ablation] [--reuse] [key=value ...]

For every seed, two runs that differ only in ``pairs.strategy`` (rubric | outcome): same policy,
steps, rounds, prompts and samples per prompt, same seed. The base policy is the ``before``
evaluation of those runs (the warm-started policy, no DPO). Every arm is measured the same way:
the held-out rubric score and essential pass rate of sampled answers (`rdpo.evaluate`, always
with the rubric, whatever the pairs were built from). Writes ``ablation.{md,json,png}`` and an
overlaid run report under `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("rdpo")

STRATEGIES = ("outcome", "rubric")
ARMS = ("base", "outcome", "rubric")
LABELS = {"base": "base policy (no DPO)", "outcome": "outcome filtering",
          "rubric": "rubric filtering (rDPO)"}


@dataclass(frozen=True)
class ArmStats:
    """One arm over the seeds: per-seed values, mean, sample standard deviation, min and max."""

    arm: str
    seeds: list[int]
    rubric_score: list[float]
    essential_pass_rate: list[float]

    @staticmethod
    def _spread(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    def summary(self) -> dict:
        return {"rubric_score": self._spread(self.rubric_score),
                "essential_pass_rate": self._spread(self.essential_pass_rate)}


@dataclass
class AblationResult:
    """The arms, the files written, and the wall time of the runs."""

    arms: dict[str, ArmStats]
    out_dir: Path
    run_dirs: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    command: str = ""


def run_dir(out_dir: Path, strategy: str, seed: int) -> Path:
    return out_dir / f"{strategy}-seed{seed}"


def run_all(config: str, seeds: list[int], out_dir: Path, overrides: list[str],
            reuse: bool = False) -> list[Path]:
    """Train every (strategy, seed) run; with `reuse`, keep runs that already have eval.json."""
    from rdpo.config import load_config
    from rdpo.fit import fit

    dirs = []
    for seed in seeds:
        for strategy in STRATEGIES:
            d = run_dir(out_dir, strategy, seed)
            dirs.append(d)
            if reuse and (d / "eval.json").is_file():
                log.info("ablation: reusing %s", d)
                continue
            cfg = load_config(config, [*overrides, f"run.dir={d}", f"run.seed={seed}",
                                       f"pairs.strategy={strategy}", "run.progress_bar=false"])
            if not cfg.data.heldout_pool:
                raise ValueError("the ablation compares held-out scores: data.heldout_pool is null")
            start = time.perf_counter()
            fit(cfg)
            log.info("ablation: %s seed %d done in %.0fs", strategy, seed, time.perf_counter() - start)
    return dirs


def collect(out_dir: Path, seeds: list[int]) -> dict[str, ArmStats]:
    """The arms from the runs' eval.json files (the base arm from their ``before``)."""
    values: dict[str, dict[str, list[float]]] = {a: {"rubric_score": [], "essential_pass_rate": []}
                                                 for a in ARMS}
    for seed in seeds:
        evals = {}
        for strategy in STRATEGIES:
            path = run_dir(out_dir, strategy, seed) / "eval.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (run the ablation without --collect-only)")
            evals[strategy] = json.loads(path.read_text())
            for key in values[strategy]:
                values[strategy][key].append(evals[strategy]["after"][key])
        # Both runs of a seed start from the same policy and sample the evaluation with the
        # same seed, so their 'before' numbers must agree: otherwise compute was not equal.
        before = [evals[s]["before"] for s in STRATEGIES]
        for key in values["base"]:
            if abs(before[0][key] - before[1][key]) > 1e-9:
                raise ValueError(f"seed {seed}: the runs' 'before' {key} differ "
                                 f"({before[0][key]} vs {before[1][key]}): not the same start")
            values["base"][key].append(before[0][key])
    return {a: ArmStats(a, list(seeds), v["rubric_score"], v["essential_pass_rate"])
            for a, v in values.items()}


def render_markdown(arms: dict[str, ArmStats]) -> str:
    """The table: mean ± standard deviation over seeds (min–max), then the per-seed values."""
    def cell(s: dict, pct: bool) -> str:
        f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
        return f"{f(s['mean'])} ± {f(s['std'])} ({f(s['min'])}–{f(s['max'])})"

    seeds = arms["base"].seeds
    out = [f"Held-out rubric score and essential pass rate (%), mean ± std over {len(seeds)} "
           "seeds (min–max):", "",
           "| arm | rubric score | essential pass (%) |", "|---|---|---|"]
    for a in ARMS:
        s = arms[a].summary()
        out.append(f"| {LABELS[a]} | {cell(s['rubric_score'], False)} "
                   f"| {cell(s['essential_pass_rate'], True)} |")
    out += ["", "Per seed (rubric score / essential pass %):", "",
            "| seed | " + " | ".join(LABELS[a] for a in ARMS) + " | rubric − outcome |",
            "|---|" + "---|" * (len(ARMS) + 1)]
    for i, seed in enumerate(seeds):
        cells = [f"{arms[a].rubric_score[i]:.3f} / {100 * arms[a].essential_pass_rate[i]:.1f}"
                 for a in ARMS]
        diff = arms["rubric"].rubric_score[i] - arms["outcome"].rubric_score[i]
        out.append(f"| {seed} | " + " | ".join(cells) + f" | {diff:+.3f} |")
    return "\n".join(out) + "\n"


def plot(arms: dict[str, ArmStats], png: Path) -> None:
    """Two panels (rubric score, essential pass rate): a bar per arm at the mean, a dot per seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=110, layout="constrained")
    colors = {"base": "#7f7f7f", "outcome": "#ff7f0e", "rubric": "#1f77b4"}
    for ax, key, title in zip(fig.subplots(1, 2), ("rubric_score", "essential_pass_rate"),
                              ("Held-out mean rubric score", "Held-out essential pass rate"),
                              strict=True):
        for x, a in enumerate(ARMS):
            vals = getattr(arms[a], key)
            s = arms[a].summary()[key]
            ax.bar(x, s["mean"], yerr=s["std"], color=colors[a], alpha=0.8, capsize=6, width=0.6)
            ax.plot([x + d for d in _jitter(len(vals))], vals, "o", color="black", ms=4)
            ax.text(x, s["mean"] + s["std"] + 0.02, f"{s['mean']:.3f}", ha="center", fontsize=9)
        ax.set_xticks(range(len(ARMS)), [LABELS[a].replace(" (", "\n(") for a in ARMS], fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    n = len(arms["base"].seeds)
    fig.suptitle(f"rDPO ablation on the synthetic shapes task: {n} seeds, equal compute "
                 "(bars: mean ± std, dots: seeds)", fontsize=11)
    fig.savefig(png)


def _jitter(n: int) -> list[float]:
    return [0.0] if n == 1 else [-0.12 + 0.24 * i / (n - 1) for i in range(n)]


def write_outputs(arms: dict[str, ArmStats], out_dir: Path, seconds: float | None,
                  command: str) -> None:
    (out_dir / "ablation.md").write_text(render_markdown(arms))
    (out_dir / "ablation.json").write_text(json.dumps({
        "command": command, "seconds": seconds,
        "arms": {a: {**asdict(s), "summary": s.summary()} for a, s in arms.items()}},
        indent=2) + "\n")
    plot(arms, out_dir / "ablation.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdpo.ablation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--collect-only", action="store_true",
                        help="no training: tabulate the runs already under --out")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from rdpo.config import ConfigError
    from rdpo.report import write_report

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m rdpo.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    try:
        if not args.collect_only:
            run_all(args.config, args.seeds, out_dir, args.overrides, reuse=args.reuse)
        seconds = None if args.collect_only else time.perf_counter() - start
        arms = collect(out_dir, args.seeds)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_outputs(arms, out_dir, seconds, command)
    write_report([run_dir(out_dir, s, seed) for seed in args.seeds for s in STRATEGIES],
                 out_dir / "report")
    print(render_markdown(arms))
    if seconds is not None:
        print(f"wall time {seconds:.0f}s for {2 * len(args.seeds)} runs")
    print(f"wrote {out_dir}/ablation.{{md,json,png}} and {out_dir}/report.{{png,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
