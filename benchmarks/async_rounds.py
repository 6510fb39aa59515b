"""Benchmark: synchronous vs asynchronous rounds (rollout.async_rounds), same recipe and seeds.

    python benchmarks/async_rounds.py [--seeds 0 1 2] [--judge-latency 0.02] [--work DIR]
        [--out benchmarks/results/async_rounds_cpu-quickstart.json] [-- key=value ...]

The quickstart recipe (configs/quickstart.yaml: its toy, its 10 rounds of 40 steps, its pool,
K = 8, its held-out evaluation) run by `python -m rdpo.fit` once per seed with
rollout.async_rounds=false and once with true. The judge is the scripted OpenAI-compatible
server (`rdpo.dev.bench.openai_server`, its own process) grading each criterion with its regex
as the quickstart's rule judge does, answering after `--judge-latency` seconds: the quickstart's
verdicts at a remote judge's pace, so the wall time shows what async hides and the held-out
numbers show what one round of staleness costs the learning. No judge cache (each run asks
everything it needs). Writes the per-run numbers and the means as JSON and prints a markdown
table: wall time of the whole command, the mean wait at a round's start, and the held-out
rubric score and ground truth (correct, hallucinating) before and after. Not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/quickstart.yaml"


def one(work: Path, seed: int, mode: str, judge: list[str], extra: list[str]) -> dict:
    run_dir = work / f"{mode}-seed{seed}"
    args = [sys.executable, "-m", "rdpo.fit", "--config", str(QUICKSTART), f"run.seed={seed}",
            f"run.dir={run_dir}", "run.overwrite=true", "run.progress_bar=false",
            "run.report=false", "judge.cache=null", *judge,
            f"rollout.async_rounds={str(mode == 'async').lower()}", *extra]
    start = time.perf_counter()
    with open(work / f"{mode}-seed{seed}.log", "w") as log:
        subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    ev = json.loads((run_dir / "eval.json").read_text())
    rows = csv.DictReader((run_dir / "logs/metrics.csv").open())
    waits = [float(r["round/seconds"]) for r in rows if r.get("round/seconds")]
    cost = json.loads((run_dir / "cost.json").read_text())
    out = {"seed": seed, "mode": mode, "seconds": seconds,
           "round_wait_seconds": statistics.fmean(waits),
           "training_seconds": cost["total"]["seconds"]["training"],
           "judge_requests": cost["total"]["judge_requests"]}
    for when in ("before", "after"):
        for key in ("rubric_score", "truth_score", "truth_correct_rate", "hallucination_rate"):
            if key in ev[when]:
                out[f"{key}_{when}"] = ev[when][key]
    out["rubric_gain"] = out["rubric_score_after"] - out["rubric_score_before"]
    if "truth_score_after" in out:
        out["truth_gain"] = out["truth_score_after"] - out["truth_score_before"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--judge-latency", type=float, default=0.02)
    parser.add_argument("--judge-concurrency", type=int, default=8)
    parser.add_argument("--work", help="run directories and logs (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/async_rounds_cpu-quickstart.json"))
    parser.add_argument("overrides", nargs="*", help="key=value for both modes (after --)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rdpo.config import load_config
    from rdpo.demo.warmstart import prepare_toy
    from rdpo.dev.bench.openai_server import FakeOpenAIServer

    work = Path(args.work or tempfile.mkdtemp(prefix="rdpo-async-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare_toy(load_config(QUICKSTART, args.overrides).toy)  # before any clock
    runs = []
    with FakeOpenAIServer(judging="rule", pools=[str(paths.train_pool), str(paths.heldout_pool)],
                          latency=args.judge_latency) as server:
        judge = [*server.judge_overrides(args.judge_concurrency), "judge.max_retries=2"]
        for seed in args.seeds:
            for mode in ("sync", "async"):
                runs.append(one(work, seed, mode, judge, args.overrides))
                print(json.dumps(runs[-1]), flush=True)
    keys = [k for k in runs[0] if k not in ("seed", "mode") and runs[0][k] is not None]
    means = {mode: {k: statistics.fmean(r[k] for r in runs if r["mode"] == mode) for k in keys}
             for mode in ("sync", "async")}
    result = {"bench": "async_rounds", "recipe": "configs/quickstart.yaml", "device": "cpu",
              "judge": f"scripted OpenAI-compatible server, rule verdicts, latency "
                       f"{args.judge_latency} s, concurrency {args.judge_concurrency}",
              "seeds": args.seeds, "overrides": args.overrides, "runs": runs, "mean": means}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| mode | wall s | wait at round start s | held-out rubric before → after | "
          "ground truth before → after | hallucinating after |\n|---|---|---|---|---|---|")
    for mode in ("sync", "async"):
        m = means[mode]
        print(f"| {mode} | {m['seconds']:.0f} | {m['round_wait_seconds']:.2f} | "
              f"{m['rubric_score_before']:.3f} → {m['rubric_score_after']:.3f} | "
              f"{m.get('truth_score_before', float('nan')):.3f} → "
              f"{m.get('truth_score_after', float('nan')):.3f} | "
              f"{m.get('hallucination_rate_after', float('nan')):.1%} |")
    print(f"(means over seeds {args.seeds}; per-run numbers in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
