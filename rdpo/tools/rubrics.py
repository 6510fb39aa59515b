"""`python -m rdpo.rubrics`: work with rubric pools from the command line.

Subcommands:

    validate POOL.jsonl [--no-images]   check every record; list every problem, or summarise
    build --input PROMPTS.jsonl --out POOL.jsonl [generator options]
                                        write a rubric per prompt with a generator model
    stats POOL.jsonl [--json]           counts and distribution of criteria
    audit POOL.jsonl --run RUN [--out DIR]
                                        criteria that never vary, are almost always unknown or
                                        saturated in a run's rounds; records that never yield a
                                        pair; discrimination on preference records
                                        (`rdpo.tools.audit`)

Each subcommand is a `_cmd_*` function of the parsed arguments returning the exit code, added
to the parser by its own `_add_*` function, so new subcommands slot in beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from rdpo.config import JudgeConfig
from rdpo.pool import PromptRecord, check_pool

GENERATOR_OPTIONS = ("kind", "model", "base_url", "api_key_env", "concurrency", "timeout",
                     "max_retries", "max_tokens", "batch_size")
"""The `JudgeConfig` fields `build` takes as options: the generator is asked like a judge."""
GENERATOR_DEFAULTS = {"kind": "openai", "cache": None}


@dataclass(frozen=True)
class PoolStats:
    """Counts over a pool's records."""

    records: int
    images: int
    essential: int
    additional: int
    with_checks: int

    @classmethod
    def of(cls, records: Sequence[PromptRecord]) -> PoolStats:
        """Tally the records (images count every reference, shared files included)."""
        criteria = [c for r in records for c in r.rubric.criteria()]
        return cls(
            records=len(records),
            images=sum(len(r.images) for r in records),
            essential=sum(len(r.rubric.essential) for r in records),
            additional=sum(len(r.rubric.additional) for r in records),
            with_checks=sum(c.check is not None for c in criteria),
        )

    def summary(self) -> str:
        """One line, e.g. `120 records, 120 images, 480 essential + 360 additional criteria (...)`."""
        return (
            f"{self.records} records, {self.images} images, {self.essential} essential + "
            f"{self.additional} additional criteria ({self.with_checks} with checks)"
        )


def _add_validate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a rubric pool and report every problem",
        description="Check every record of a pool. Exit 0 and print a summary if it is valid; "
        "exit 1 and print one FILE:LINE: field: message line per problem on stderr otherwise.",
    )
    p.add_argument("pool", help="the pool file (JSON Lines)")
    p.add_argument("--no-images", action="store_true", help="do not open the image files")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    records, problems = check_pool(args.pool, open_images=not args.no_images)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"{args.pool}: {PoolStats.of(records).summary()}")
    return 0


def _add_build(subparsers: argparse._SubParsersAction) -> None:
    from rdpo.confighelp import add_options

    p = subparsers.add_parser(
        "build", help="build a rubric pool from prompts with a generator model",
        description="Ask a generator model for a checklist rubric per prompt (guided by the "
        "reference answer when present), validate it with the pool schema, retry invalid "
        "output, and append each record to --out as soon as it is built. Re-running skips ids "
        "already in --out; records that still fail are listed in the failures file.")
    p.add_argument("--input", required=True, help="prompts JSONL: id, images, instruction, "
                   "optional reference")
    p.add_argument("--out", required=True, help="the pool to write (JSON Lines, appended)")
    p.add_argument("--failures", help="failures JSONL (default: OUT.failures.jsonl)")
    p.add_argument("--attempts", type=int, default=3,
                   help="generator calls per record before it is reported as failed")
    add_options(p, JudgeConfig, GENERATOR_OPTIONS, GENERATOR_DEFAULTS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    from rdpo.confighelp import section_from_args
    from rdpo.judging.chat import ChatError, make_chat
    from rdpo.tools.rubric_build import build_pool

    if args.kind == "rule":
        print("error: --kind rule cannot write rubrics; use transformers or openai",
              file=sys.stderr)
        return 2
    cfg, problems = section_from_args(JudgeConfig, args, GENERATOR_OPTIONS, GENERATOR_DEFAULTS)
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        chat = make_chat(cfg)
        summary = build_pool(args.input, args.out, chat, failures=args.failures,
                             attempts=args.attempts, progress=not args.no_progress)
    except (ValueError, ChatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary.text())
    return 1 if summary.failed else 0


def _add_stats(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stats", help="counts and distribution of a pool's criteria",
                              description="Counts and distributions of a valid pool's criteria.")
    p.add_argument("pool", help="the pool file (JSON Lines)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    from rdpo.tools.rubric_build import pool_stats

    records, problems = check_pool(args.pool, open_images=False)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    stats = pool_stats(records)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{args.pool}: {PoolStats.of(records).summary()}")
    for key in ("images_per_record", "essential_per_record", "additional_per_record",
                "criteria_per_record", "additional_weight"):
        d = stats[key]
        hist = ", ".join(f"{k}: {v}" for k, v in d["histogram"].items())
        print(f"  {key}: min {d['min']}, mean {d['mean']:.2f}, max {d['max']} ({hist})")
    for key in ("pitfalls", "with_checks", "with_reference", "with_outcome"):
        print(f"  {key}: {stats[key]}")
    return 0


def _add_audit(subparsers: argparse._SubParsersAction) -> None:
    from rdpo.tools.audit import Thresholds

    t = Thresholds()
    p = subparsers.add_parser(
        "audit", help="what a run's rounds got from each criterion and record of a pool",
        description="From a run's round files: criteria that never vary across a prompt's K "
        "samples, criteria almost always unknown, criteria met by nearly every response of a "
        "round (saturated), records that never yield a pair and why (drop reasons). When POOL "
        "is a preference file with rubrics (responses + preferred), also whether each rubric "
        "ranks the preferred response higher (discrimination), judged by the run's judge. "
        "Prints Markdown; --out DIR writes audit.md and audit.json.")
    p.add_argument("pool", help="the rubric pool, or a preference file with rubrics (JSON Lines)")
    p.add_argument("--run", help="the run directory whose rounds/NNNN files are audited")
    p.add_argument("--rounds", type=int, nargs="+", help="only these rounds (default: all)")
    p.add_argument("--judge", metavar="YAML", help="the judge of the discrimination check: a "
                   "YAML with a judge section (default: RUN/config.yaml, the run's own judge)")
    p.add_argument("--aggregation", help="score aggregation of the discrimination check "
                   "(default: the run's pairs.aggregation, else lexicographic)")
    p.add_argument("--saturated", type=float, default=t.saturated,
                   help=f"share of a round's responses meeting a criterion at or above which it "
                   f"is saturated (default {t.saturated})")
    p.add_argument("--unknown", type=float, default=t.unknown,
                   help=f"share of unknown verdicts at or above which a criterion is almost "
                   f"always unknown (default {t.unknown})")
    p.add_argument("--min-samples", type=int, default=t.min_samples,
                   help="known verdicts a prompt needs in a round to show whether a criterion "
                   f"varies (default {t.min_samples})")
    p.add_argument("--top", type=int, default=20, help="rows per Markdown table (default 20)")
    p.add_argument("--out", metavar="DIR", help="write audit.md and audit.json here")
    p.add_argument("--json", action="store_true", help="print the JSON instead of Markdown")
    p.set_defaults(func=_cmd_audit)


def _audit_pool(path: str):
    """(records with a rubric by id, preference pairs or None): a preference file when its
    first record has ``responses``."""
    from pathlib import Path

    from rdpo.pool import load_pool
    from rdpo.tools.agreement import read_jsonl

    first = next(iter(read_jsonl(Path(path))), (0, {}))[1] if Path(path).is_file() else {}
    if "responses" in first:
        from rdpo.tools.preferences import load_preferences

        prefs = load_preferences(path)
        return {p.record.id: p.record for p in prefs if p.has_rubric}, prefs
    return {r.id: r for r in load_pool(path, open_images=False)}, None


def _cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omegaconf import OmegaConf

    from rdpo.config import ConfigError
    from rdpo.judging.chat import ChatError
    from rdpo.tools import audit

    problems = [f"--{k.replace('_', '-')}: must be in [0, 1], got {getattr(args, k)}"
                for k in ("saturated", "unknown") if not 0 <= getattr(args, k) <= 1]
    if args.min_samples < 2:
        problems.append(f"--min-samples: at least 2 (one verdict cannot vary), got {args.min_samples}")
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        records, prefs = _audit_pool(args.pool)
        if not args.run and not prefs:
            raise ValueError("give --run RUN (its rounds are audited), or a preference file "
                             "as POOL (discrimination only)")
        result: dict = {"pool": args.pool, "run_dir": args.run}
        thresholds = audit.Thresholds(args.saturated, args.unknown, args.min_samples)
        result["thresholds"] = asdict(thresholds)
        run_cfg = Path(args.run) / "config.yaml" if args.run else None
        if args.run:
            result["run"] = audit.audit_run(records, audit.read_rounds(args.run, args.rounds),
                                            thresholds)
        if prefs:
            from rdpo.tools.judge_options import build_judge, judge_config

            judge_yaml = args.judge or (str(run_cfg) if run_cfg and run_cfg.is_file() else None)
            if judge_yaml is None:
                raise ValueError("the discrimination check needs a judge: --judge YAML or --run")
            cfg, seed = judge_config("judge", judge_yaml, [])
            aggregation = args.aggregation or (
                OmegaConf.select(OmegaConf.load(judge_yaml), "pairs.aggregation", default=None)
                or "lexicographic")
            judge = build_judge(cfg, seed or 0)
            result["judge"] = f"{cfg.kind} judge" + (f" {cfg.model}" if cfg.model else "") \
                + f" ({judge_yaml})"
            result["discrimination"] = audit.discrimination(judge, prefs, aggregation)
    except (ConfigError, ValueError, ChatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    text = audit.markdown(result, args.top)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "audit.md").write_text(text)
        print(f"wrote {out / 'audit.md'} and {out / 'audit.json'}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else text, end="\n" if args.json else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `rdpo.tools.rubrics` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m rdpo.rubrics", description=__doc__.split("\n")[0]
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(subparsers)
    _add_build(subparsers)
    _add_stats(subparsers)
    _add_audit(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
