"""Benchmark: DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 on two CPU ranks, same seed and config.

    python benchmarks/deepspeed_vs_ddp.py [--steps 16] [--cache .cache/rdpo] [--work DIR]

The small toy of the tests (16 training and 8 held-out prompts, a 150-step warm start) for
`--steps` steps in rounds of 4, each strategy run by `python -m rdpo.fit` on two CPU ranks.
Prints a markdown table: the DPO loss at each step, the held-out rubric score before and
after, and the wall time of the whole command (start-up included), and writes it with the
raw numbers as JSON to WORK/deepspeed_vs_ddp.json. Not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from small_toy import QUICKSTART, SMALL  # noqa: E402

STRATEGIES = {
    "ddp": ["run.strategy=ddp"],
    "zero2": ["run.strategy=deepspeed", "run.deepspeed_stage=2"],
    "zero3": ["run.strategy=deepspeed", "run.deepspeed_stage=3"],
}


def run(name: str, work: Path, cache: str, steps: int) -> dict:
    run_dir = work / name
    args = [sys.executable, "-m", "rdpo.fit", "--config", str(QUICKSTART), *SMALL,
            "run.report=false", "run.threads=1", f"dpo.max_steps={steps}",
            "rollout.every_n_steps=4", "run.devices=2", "run.accelerator=cpu",
            "data.prompts_per_round=8", f"run.dir={run_dir}", f"toy.cache_dir={cache}",
            *STRATEGIES[name]]
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    rows = csv.DictReader((run_dir / "logs/metrics.csv").open())
    losses = [float(r["train/dpo_loss_step"]) for r in rows if r.get("train/dpo_loss_step")]
    ev = json.loads((run_dir / "eval.json").read_text())
    return {"losses": losses, "before": ev["before"]["rubric_score"],
            "after": ev["after"]["rubric_score"], "seconds": seconds}


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for step in range(len(next(iter(results.values()))["losses"])):
        lines.append(f"| {step} | " + " | ".join(f"{results[n]['losses'][step]:.6f}"
                                                 for n in names) + " |")
    for key, fmt in (("before", "{:.3f}"), ("after", "{:.3f}"), ("seconds", "{:.0f}")):
        label = {"before": "held-out before", "after": "held-out after",
                 "seconds": "wall time (s)"}[key]
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (rounds of 4)")
    p.add_argument("--cache", default=".cache/rdpo", help="toy.cache_dir (the toy is built once)")
    p.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder)")
    p.add_argument("--only", nargs="*", choices=list(STRATEGIES), help="run only these")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="rdpo-ds-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {name: run(name, work, args.cache, args.steps) for name in args.only or STRATEGIES}
    (work / "deepspeed_vs_ddp.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
