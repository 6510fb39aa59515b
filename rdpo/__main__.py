"""``python -m rdpo``: the commands, one table from command to module.

    python -m rdpo                 # this table
    python -m rdpo fit --config configs/quickstart.yaml   # = python -m rdpo.fit --config ...

Every command also runs as ``python -m rdpo.<command>`` (the form scripts and sbatch files use).
"""

from __future__ import annotations

import runpy
import sys

# command -> (module it runs, what it does). The trainer first, then the tools around a run,
# then the lab work (benchmarks, the ablation).
COMMANDS = {
    "fit": ("rdpo.fit", "train: rounds of rollouts, rubric judging and DPO (--help: every setting)"),
    "confighelp": ("rdpo.confighelp", "the configuration reference, rendered from the schema"),
    "report": ("rdpo.report", "a run's report.png and summary from its run directory"),
    "export": ("rdpo.tools.export", "a finished run as a PEFT adapter or a merged checkpoint"),
    "generate": ("rdpo.tools.try_policy", "try a policy: sample answers for an image and a prompt, judged"),
    "rubrics": ("rdpo.tools.rubrics", "rubric pools: validate, build, stats, audit (what a run got from each criterion)"),
    "evaluate": ("rdpo.tools.evaluate", "judges: accuracy on preference pairs, agreement of two judges; lmms-eval hand-off"),
    "bench": ("rdpo.dev.bench", "benchmarks: the DPO step against TRL, a round's sampling"),
    "ablation": ("rdpo.dev.ablation.run", "rubric vs outcome filtering at equal compute, per seed"),
    "simjudges": ("rdpo.demo.simjudges", "the toy's simulated judges and their calibration"),
}


def table() -> str:
    """The command table ``python -m rdpo`` prints."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m rdpo COMMAND [ARGS]   (or python -m rdpo.COMMAND [ARGS])", ""]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def run(module: str, argv: list[str] | None = None) -> None:
    """Run `module` as ``__main__`` with `argv` (default: this process's arguments)."""
    if argv is not None:
        sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(table())
        return 0
    if argv[0] not in COMMANDS:
        print(f"python -m rdpo: no command {argv[0]!r}\n\n{table()}", file=sys.stderr)
        return 2
    run(COMMANDS[argv[0]][0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
