"""`python -m rdpo.rubrics`: work with rubric pools from the command line.

Subcommands:

    validate POOL.jsonl [--no-images]   check every record; list every problem, or summarise

Each subcommand is a `_cmd_*` function of the parsed arguments returning the exit code, added
to the parser by its own `_add_*` function, so new subcommands slot in beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rdpo.pool import PromptRecord, check_pool


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


def build_parser() -> argparse.ArgumentParser:
    """The `rdpo.rubrics` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m rdpo.rubrics", description=__doc__.split("\n")[0]
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
