"""The ablation: base policy vs outcome vs holistic-with-rubric vs rubric filtering, equal compute.

    python -m rdpo.ablation [--config configs/ablation_hard.yaml] [--seeds 0 1 2 3 4]
                            [--out runs/ablation] [--docs docs/ablation] [--reuse]
                            [--collect-only] [key=value ...]

For every seed, three runs that differ only in ``pairs.strategy`` (outcome | rubric_holistic |
rubric): same policy, steps, rounds, prompts and samples per prompt, same seed, same judge
settings. rubric_holistic (one 1-10 score from a judge shown the rubric, no per-criterion
verdicts) splits rubric filtering's effect into what the judge knowing the criteria gives and
what the checklist structure adds. The base policy is the ``before`` evaluation of those runs
(the warm-started policy, no DPO). Every arm is measured
the same way on the held-out prompts, on two yardsticks: the toy's ground truth
(`rdpo.demo.truth`: the answer's claims checked against the scene, no rubric) and the exact
RuleJudge's rubric score (the rubric arm's own reward, without the simulated judge's noise).

Evidence goes to `--docs`: each run's eval.json, config.yaml and rounds.json (pairs kept and
dropped by reason, mean judged score, per round), ``ablation.{json,md,png}`` with the git commit,
the machine, the warm start's weights hash and the simulated judges' calibration
(`rdpo.demo.simjudges.calibrate`). The section of docs/ablation.md between the ablation markers
is generated from that JSON (`rdpo.dev.ablation.report`); ``--collect-only`` redoes tables, figure
and that section from the files already in `--docs` without training.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rdpo import console
from rdpo.dev.ablation.report import ARMS, METRICS, STRATEGIES, plot, render_markdown, update_readme

log = logging.getLogger("rdpo")


@dataclass(frozen=True)
class ArmStats:
    """One arm over the seeds: per-seed values of every metric, and their spread."""

    arm: str
    seeds: list[int]
    values: dict[str, list[float]]

    @staticmethod
    def _spread(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    def summary(self) -> dict:
        return {k: self._spread(v) for k, v in self.values.items()}


def run_dir(out_dir: Path, strategy: str, seed: int) -> Path:
    return Path(out_dir) / f"{strategy}-seed{seed}"


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
            # run.overwrite: an earlier run there is deleted first (stale rounds of an earlier,
            # longer run would join rounds.json); a folder that is no run directory is refused.
            cfg = load_config(config, [*overrides, f"run.dir={d}", f"run.seed={seed}",
                                       f"pairs.strategy={strategy}", "run.progress_bar=false",
                                       "run.overwrite=true"])
            if not cfg.data.heldout_pool:
                raise ValueError("the ablation compares held-out scores: data.heldout_pool is null")
            start = time.perf_counter()
            fit(cfg)
            log.info("ablation: %s seed %d done in %.0fs", strategy, seed, time.perf_counter() - start)
    return dirs


def round_summaries(run: Path) -> list[dict]:
    """Per round: prompts, pairs kept, drops by reason, truncated answers, mean judged score."""
    out = []
    for rdir in sorted((run / "rounds").glob("[0-9]*")):
        summary = next((json.loads(line)["summary"] for line in
                        (rdir / "pairs.jsonl").read_text().splitlines()
                        if line.startswith('{"summary"')), {})
        scores = [json.loads(line)["score"] for line in
                  (rdir / "rollouts.jsonl").read_text().splitlines() if line.strip()]
        out.append({"round": int(rdir.name), "prompts": summary.get("prompts"),
                    "kept": summary.get("kept"), "dropped": summary.get("dropped", {}),
                    "truncated_responses": summary.get("truncated_responses"),
                    "mean_judged_score": statistics.fmean(scores) if scores else None})
    return out


def export_runs(out_dir: Path, docs: Path, seeds: list[int]) -> None:
    """Copy each run's eval.json and config.yaml to `docs`/runs/, with its rounds.json."""
    for seed in seeds:
        for strategy in STRATEGIES:
            src, dst = run_dir(out_dir, strategy, seed), run_dir(docs / "runs", strategy, seed)
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("eval.json", "config.yaml"):
                shutil.copyfile(src / name, dst / name)
            (dst / "rounds.json").write_text(json.dumps(round_summaries(src), indent=1) + "\n")


def collect(runs: Path, seeds: list[int]) -> dict[str, ArmStats]:
    """The arms from the runs' eval.json files (the base arm from their ``before``)."""
    values: dict[str, dict[str, list[float]]] = {a: {m: [] for m in METRICS} for a in ARMS}
    for seed in seeds:
        evals = {}
        for strategy in STRATEGIES:
            path = run_dir(runs, strategy, seed) / "eval.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (run the ablation without --collect-only)")
            evals[strategy] = json.loads(path.read_text())
            for key in values[strategy]:
                values[strategy][key].append(evals[strategy]["after"].get(key, float("nan")))
        # The runs of a seed start from the same policy and sample the evaluation with the
        # same seed, so their 'before' numbers must agree: otherwise compute was not equal.
        before = [evals[s]["before"] for s in STRATEGIES]
        for key in values["base"]:
            a, *others = (x.get(key, float("nan")) for x in before)
            if any(abs(a - b) > 1e-9 for b in others):
                found = ", ".join(f"{s} {x.get(key, float('nan'))}"
                                  for s, x in zip(STRATEGIES, before, strict=True))
                raise ValueError(f"seed {seed}: the runs' 'before' {key} differ ({found}): "
                                 "not the same start")
            values["base"][key].append(a)
    return {a: ArmStats(a, list(seeds), v) for a, v in values.items()}


def pair_stats(runs: Path, seeds: list[int]) -> dict:
    """Per strategy, from the runs' rounds.json: mean prompts and pairs kept per round, and the
    drops by reason summed over rounds and seeds."""
    out = {}
    for strategy in STRATEGIES:
        rounds = [r for seed in seeds for r in json.loads(
            (run_dir(runs, strategy, seed) / "rounds.json").read_text())]
        dropped: dict[str, int] = {}
        for r in rounds:
            for reason, n in r["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        out[strategy] = {"rounds": len(rounds),
                         "prompts_per_round": statistics.fmean(r["prompts"] for r in rounds),
                         "kept_per_round": statistics.fmean(r["kept"] for r in rounds),
                         "dropped": {k: v for k, v in dropped.items() if v}}
    return out


def dirty_code(porcelain: str, evidence: tuple[str, ...] = ()) -> list[str]:
    """The paths `git status --porcelain` lists, less those under `evidence` (the ablation's own
    output folder and page, which it has rewritten by the time the facts are taken)."""
    paths = [line[3:] if line[2:3] == " " else line.split(maxsplit=1)[-1]
             for line in porcelain.splitlines() if line.strip()]
    return [p for p in paths
            if not any(p == e or p.startswith(e.rstrip("/") + "/") for e in evidence)]


def machine_facts(threads: int, evidence: tuple[str, ...] = ()) -> dict:
    """What the numbers depend on besides the code: commit (and files changed since it, the
    `evidence` paths left out), torch, threads, CPU."""
    import os
    import platform
    import subprocess

    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu, flags = "unknown", ""
    if Path("/proc/cpuinfo").is_file():
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name")), cpu)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return {"commit": git("rev-parse", "HEAD").strip(),
            "dirty_files": dirty_code(git("status", "--porcelain", "--untracked-files=no"),
                                      evidence),
            "torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(),
            "cpu": cpu, "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")
                                if f" {f}" in flags],
            "python": platform.python_version()}


def warm_start_hash(policy: Path) -> str:
    """SHA-256 of the warm-started weights: equal on two machines = the same start."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(policy).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def write_outputs(arms: dict[str, ArmStats], docs: Path, facts: dict, readme: Path | None) -> dict:
    """ablation.{json,md,png} in `docs`; the generated section of the page `readme`
    (docs/ablation.md) when given."""
    data = {**facts, "arms": {a: {"seeds": s.seeds, "values": s.values, "summary": s.summary()}
                              for a, s in arms.items()}}
    (docs / "ablation.json").write_text(json.dumps(data, indent=2) + "\n")
    (docs / "ablation.md").write_text(render_markdown(data))
    plot(data, docs / "ablation.png")
    if readme is not None:
        update_readme(readme, data)
    return data


def _facts(args, seconds: float | None) -> dict:
    from rdpo.config import load_config
    from rdpo.demo.paths import toy_paths
    from rdpo.demo.simjudges import calibrate

    cfg = load_config(args.config, [*args.overrides, "run.dir=unused"])
    facts = {"command": "python -m rdpo.ablation " + " ".join(args.argv), "seconds": seconds,
             "seeds": args.seeds, "docs": str(args.docs), "config": args.config,
             "settings": {"toy.task": cfg.toy.task, "judge.noise": cfg.judge.noise,
                          "judge.outcome": cfg.judge.outcome,
                          "judge.outcome_noise": cfg.judge.outcome_noise,
                          "dpo.max_steps": cfg.dpo.max_steps,
                          "rollout.every_n_steps": cfg.rollout.every_n_steps,
                          "data.prompts_per_round": cfg.data.prompts_per_round,
                          "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
                          "eval.samples_per_prompt": cfg.eval.samples_per_prompt,
                          "eval.max_prompts": cfg.eval.max_prompts,
                          "toy.n_heldout": cfg.toy.n_heldout},
             "machine": machine_facts(cfg.run.threads,
                                      (str(args.docs), *([args.readme] if args.readme else [])))}
    if cfg.toy.enabled:
        facts["warm_start_sha256"] = warm_start_hash(toy_paths(cfg.toy).policy)
        if cfg.judge.kind == "rule":
            facts["calibration"] = calibrate(cfg.toy, cfg.judge, args.seeds)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdpo.ablation",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ablation_hard.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="runs/ablation", help="where the runs train")
    parser.add_argument("--docs", default="docs/ablation", help="where the evidence goes")
    parser.add_argument("--page", "--readme", dest="readme", default="docs/ablation.md",
                        help="page whose ablation section is rewritten ('' for none; --readme "
                        "is its old name)")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--collect-only", action="store_true",
                        help="no training: tables, figure and page from the files in --docs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    console.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    # The runs train in-process: the console of `python -m rdpo.fit` (no doubled Lightning
    # lines, known third-party notices off, -q / -v).
    console.setup(console.verbosity(args))
    from rdpo.config import ConfigError

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    readme = Path(args.readme) if args.readme else None
    start = time.perf_counter()
    try:
        if args.collect_only:
            old = docs / "ablation.json"
            if not old.is_file():
                raise FileNotFoundError(f"{old}: missing (run the ablation without --collect-only)")
            facts = {k: v for k, v in json.loads(old.read_text()).items() if k != "arms"}
        else:
            run_all(args.config, args.seeds, Path(args.out), args.overrides, reuse=args.reuse)
            export_runs(Path(args.out), docs, args.seeds)
            facts = _facts(args, time.perf_counter() - start)
        arms = collect(docs / "runs", facts["seeds"])
        facts["pairs"] = pair_stats(docs / "runs", facts["seeds"])
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = write_outputs(arms, docs, facts, readme)
    if not args.collect_only:
        from rdpo.report import write_report

        write_report([run_dir(Path(args.out), s, seed) for seed in args.seeds for s in STRATEGIES],
                     Path(args.out) / "report")
    print(render_markdown(data))
    print(f"wrote {docs}/ablation.{{md,json,png}}" + (f" and {readme}" if readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
