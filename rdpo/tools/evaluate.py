"""A judge's accuracy on pairwise preference data, two judges' agreement, and the hand-off to
lmms-eval / VLMEvalKit (a policy's held-out rubric score is `rdpo.rounds.evaluate_policy`).

    python -m rdpo.evaluate judge --data PAIRS.jsonl [--kind openai --model M --base-url URL ...]
    python -m rdpo.evaluate agreement (--run RUN | --data PAIRS.jsonl) [--a.kind K --a.model M ...
                                      | --a JUDGE.yaml] (--b.OPTION ... | --b JUDGE.yaml)
                                      [--consistency] [--out FILE]   (`rdpo.tools.agreement`)
    python -m rdpo.evaluate handoff RUN [--out DIR] [--lmms-task DIR]   (`rdpo.tools.handoff`)

The judge options are the fields of the config's `JudgeConfig` (names, defaults, help).

Preference records: ``id``, ``images`` (paths relative to the file), ``instruction``,
``responses`` (two strings), ``preferred`` (0 or 1), optional ``rubric`` (pool schema). Each
response is scored with the rubric (records that have one) and without it (a holistic 1-10
score); the pair counts as correct when the preferred response scores strictly higher.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rdpo.config import JudgeConfig, PairsConfig
from rdpo.judging.scoring import score_response
from rdpo.tools.judge_options import (
    JUDGE_DEFAULTS,
    JUDGE_OPTIONS,
    SPEC_OPTIONS,
    split_judge_options,
)
from rdpo.tools.preferences import PreferencePair, load_preferences  # noqa: F401  (public names)

JUDGES = ("a", "b")
"""The two judges of `agreement`: ``--a.OPTION``, ``--b.OPTION``."""

# -- judge evaluation ----------------------------------------------------------------------------

def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion (sound near 0, 1 and for small n)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class ModeResult:
    """Accuracy of one judging mode: ties and unknowns count as not correct in `accuracy`."""

    n: int
    correct: int
    ties: int
    unknown: int
    accuracy: float
    ci95: tuple[float, float]
    accuracy_decided: float | None
    """Accuracy over pairs that were neither tied nor unknown (None if there are none)."""


def _tally(outcomes: list[str]) -> ModeResult:
    n, correct = len(outcomes), outcomes.count("correct")
    ties, unknown = outcomes.count("tie"), outcomes.count("unknown")
    decided = n - ties - unknown
    return ModeResult(n, correct, ties, unknown, correct / n if n else 0.0, wilson(correct, n),
                      correct / decided if decided else None)


def _compare(a: float | None, b: float | None, preferred: int) -> str:
    if a is None or b is None:
        return "unknown"
    if a == b:
        return "tie"
    return "correct" if (a > b) == (preferred == 0) else "wrong"


def evaluate_judge(judge, pairs: Sequence[PreferencePair],
                   aggregation: str = PairsConfig.aggregation) -> dict:
    """Accuracy with the rubric (pairs that have one) and without it, ties, unknowns, 95% CI.

    With the rubric, a response whose essential verdicts are not all known is unknown (its
    score could hide a failed essential criterion, as in pair selection). Without the rubric,
    the judge's holistic score decides; a score it could not give is unknown.
    """
    with_rubric = [p for p in pairs if p.has_rubric]
    rubric_outcomes = []
    if with_rubric:
        verdicts = judge.judge_many([(p.record, p.responses) for p in with_rubric])
        for p, vs in zip(with_rubric, verdicts, strict=True):
            scores = [score_response(p.record.rubric, v, aggregation) for v in vs]
            a, b = (None if s.unknown_essential else s.value for s in scores)
            rubric_outcomes.append(_compare(a, b, p.preferred))
    holistic = judge.outcome_many([(p.record, p.responses) for p in pairs])
    plain_outcomes = [_compare(s[0], s[1], p.preferred) for p, s in zip(pairs, holistic, strict=True)]
    return {"pairs": len(pairs), "interval": "wilson",
            "with_rubric": asdict(_tally(rubric_outcomes)),
            "without_rubric": asdict(_tally(plain_outcomes))}


def _cmd_judge(args: argparse.Namespace) -> int:
    from rdpo.confighelp import section_from_args
    from rdpo.judging.chat import ChatError
    from rdpo.judging.judges import make_judge

    cfg, problems = section_from_args(JudgeConfig, args, JUDGE_OPTIONS, JUDGE_DEFAULTS)
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        pairs = load_preferences(args.data)
        judge = make_judge(cfg)
        result = evaluate_judge(judge, pairs, args.aggregation)
    except (ValueError, ChatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result = {"data": str(args.data), "judge": {"kind": cfg.kind, "model": cfg.model},
              **result, "judge_stats": getattr(judge, "stats", {})}
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out or Path(args.data).with_suffix(".judge_eval.json"))
    out.write_text(text + "\n")
    print(f"written to {out}", file=sys.stderr)
    return 0


def _cmd_agreement(args: argparse.Namespace) -> int:
    from rdpo.config import ConfigError
    from rdpo.judging.chat import ChatError
    from rdpo.tools import agreement as ag
    from rdpo.tools.judge_options import build_judge, judge_config

    if bool(args.run) == bool(args.data):
        print("error: give the responses: --run RUN (its rounds) or --data PAIRS.jsonl",
              file=sys.stderr)
        return 2
    try:
        specs = {}
        for j in JUDGES:
            path, tokens = getattr(args, j), args.judge_tokens[j]
            specs[j] = judge_config(j, path, tokens) if path or tokens else None
        if specs["b"] is None or (specs["a"] is None and not args.run):
            raise ConfigError(["name both judges: --a.kind ... / --a JUDGE.yaml and --b.kind ... "
                               "/ --b JUDGE.yaml (with --run, judge a may be left out: the "
                               "verdicts the run recorded)"])
        responses = (ag.responses_from_run(args.run, args.rounds, args.pool) if args.run
                     else ag.responses_from_preferences(args.data))
        responses = responses.sample(args.max_responses, args.seed)
        if specs["a"] is None and any(v is None for v in responses.recorded):
            raise ValueError(f"{args.run}: its rounds recorded no per-criterion verdicts "
                             "(pairs.strategy outcome or rubric_holistic): name judge a")
        judges = {j: ag.Recorded(responses) if spec is None else build_judge(
            spec[0], spec[1] if spec[1] is not None else args.seed) for j, spec in specs.items()}
        verdicts = {j: ag.judge_all(judges[j], responses.records, responses.responses)
                    for j in JUDGES}
        pairs = ag.verdict_pairs(responses.records, verdicts["a"], verdicts["b"])
        result = {"source": responses.source, "responses": len(responses.responses),
                  "prompts": len({r.id for r in responses.records}),
                  "judges": {j: _describe(specs[j], judges[j]) for j in JUDGES},
                  **ag.agreement_report(pairs, resamples=args.resamples, seed=args.seed)}
        if args.consistency:
            result["consistency"] = _consistency(args, judges, specs, responses, verdicts)
        result["judge_stats"] = {j: dict(getattr(judges[j], "stats", {})) for j in JUDGES}
    except (ConfigError, ValueError, ChatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"written to {args.out}", file=sys.stderr)
    return 0


def _describe(spec, judge) -> dict:
    if spec is None:
        return {"kind": "recorded", "name": "the verdicts the run's judge recorded"}
    cfg = spec[0]
    return {"kind": cfg.kind, "model": cfg.model, "base_url": cfg.base_url, "noise": cfg.noise,
            "name": getattr(judge, "name", type(judge).__name__)}


def _consistency(args, judges, specs, responses, verdicts) -> dict:
    """Judge `args.consistency` asked again with every rubric reordered (seeded)."""
    from rdpo.tools import agreement as ag

    who = args.consistency
    if specs[who] is None:
        raise ValueError(f"--consistency {who}: judge {who} is the run's recorded verdicts, "
                         "which cannot be asked again; name a live judge")
    shuffled, keep = {}, []
    for i, record in enumerate(responses.records):
        if record.id not in shuffled:
            shuffled[record.id] = ag.reordered(record, args.seed)
        if shuffled[record.id] is not None:
            keep.append(i)
    again = ag.judge_all(judges[who], [shuffled[responses.records[i].id] for i in keep],
                         [responses.responses[i] for i in keep])
    pairs = ag.verdict_pairs([responses.records[i] for i in keep],
                             [verdicts[who][i] for i in keep], again)
    return {"judge": who, "order": f"criteria shuffled per prompt (seed {args.seed})",
            "responses": len(keep), "skipped_single_criterion": len(responses.records) - len(keep),
            **ag.flip_report(pairs, resamples=args.resamples, seed=args.seed)}


def _cmd_handoff(args: argparse.Namespace) -> int:
    from rdpo.config import load_config
    from rdpo.tools.handoff import markdown, run_handoff

    try:
        h = run_handoff(args.run_dir, args.out, args.dtype)
        if args.lmms_task:
            from rdpo.tools.lmms_task import write_task

            cfg = load_config(Path(args.run_dir) / "config.yaml")
            if not cfg.data.heldout_pool:
                raise ValueError(f"{args.run_dir}: data.heldout_pool is not set: no pool for "
                                 f"--lmms-task")
            write_task(args.lmms_task, cfg.data.heldout_pool, name="rdpo_heldout",
                       max_new_tokens=cfg.rollout.max_new_tokens,
                       toy=cfg.toy if cfg.toy.enabled else None,
                       aggregation=cfg.pairs.aggregation)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(h), indent=2) if args.json else markdown(h), end="")
    if args.lmms_task:
        print(f"\nlmms-eval task rdpo_heldout written to {args.lmms_task}: add --include_path "
              f"{args.lmms_task} --tasks rdpo_heldout", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rdpo.confighelp import add_options

    parser = argparse.ArgumentParser(prog="python -m rdpo.evaluate",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("judge", help="judge accuracy on pairwise preference data",
                       description="Judge accuracy with and without the rubric on pairwise "
                       "preference data; ties and unknowns count as not correct; 95% Wilson "
                       "interval. Prints JSON and writes it to --out.")
    p.add_argument("--data", required=True, help="preference JSONL (id, images, instruction, "
                   "responses, preferred, optional rubric)")
    p.add_argument("--out", help="result JSON (default: DATA with suffix .judge_eval.json)")
    add_options(p, JudgeConfig, JUDGE_OPTIONS, JUDGE_DEFAULTS)
    add_options(p, PairsConfig, ("aggregation",))
    p.set_defaults(func=_cmd_judge)
    _add_agreement(sub)
    p = sub.add_parser("handoff", help="lmms-eval / VLMEvalKit commands for a run's policy",
                       description="How to evaluate RUN's policy in lmms-eval and VLMEvalKit as "
                       "it was trained (pixel bounds, system turn, generation), for a run still "
                       "training: what python -m rdpo.export RUN --out DIR --merge writes to "
                       "DIR/HANDOFF.md. Exports nothing.")
    p.add_argument("run_dir", metavar="RUN", help="a run's run.dir (finished or training)")
    p.add_argument("--out", help="the folder the policy will be exported to (default: RUN/export)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the export's dtype (default: the run's model.dtype)")
    p.add_argument("--json", action="store_true", help="print handoff.json instead")
    p.add_argument("--lmms-task", metavar="DIR", help="also write an lmms-eval task over the "
                   "run's held-out pool (rdpo's rubric score; the toy's ground truth) to DIR")
    p.set_defaults(func=_cmd_handoff)
    return parser


def _add_agreement(sub) -> None:
    from rdpo.confighelp import option

    p = sub.add_parser(
        "agreement", help="two judges' agreement (Cohen's kappa) on the same responses",
        allow_abbrev=False,
        description="Two judges on the same responses, criterion by criterion: Cohen's kappa "
        "and raw agreement over all criteria, essential, additional and per criterion, with a "
        "seeded bootstrap 95% interval (resampling prompts), and each judge's unknown rate. "
        "Each judge is --a.OPTION / --b.OPTION (options: "
        + ", ".join(option(o)[2:] for o in SPEC_OPTIONS) + "; kind defaults to openai) "
        "and/or --a / --b YAML (a judge section or a run's config.yaml). With --run, judge a "
        "left out is the verdicts the run recorded. Prints JSON (and writes --out).")
    p.add_argument("--run", help="a run directory: the responses of its rounds/NNNN/rollouts.jsonl")
    p.add_argument("--rounds", type=int, nargs="+", help="only these rounds (default: all)")
    p.add_argument("--pool", help="the run's prompts (default: data.train_pool of RUN/config.yaml)")
    p.add_argument("--data", help="or a preference JSONL with rubrics (evaluate judge's format): "
                   "both responses of each record")
    for j in JUDGES:
        p.add_argument(f"--{j}", metavar="JUDGE.yaml",
                       help=f"judge {j}'s settings from a YAML file (--{j}.OPTION overrides)")
    p.add_argument("--consistency", nargs="?", const="a", choices=JUDGES,
                   help="also ask judge a (or b) again with each rubric's criteria shuffled "
                   "(seeded) and count the verdicts that flip (position bias)")
    p.add_argument("--max-responses", type=int, help="judge a seeded sample of this many "
                   "distinct responses (default: all)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap, the sample, the "
                   "shuffles and a noisy rule judge (default 0; a run's YAML gives its run.seed)")
    p.add_argument("--out", help="also write the JSON here")
    p.set_defaults(func=_cmd_agreement)


def main(argv: Sequence[str] | None = None) -> int:
    rest, tokens = split_judge_options(sys.argv[1:] if argv is None else argv, JUDGES)
    args = build_parser().parse_args(rest)
    if args.command != "agreement" and any(tokens.values()):
        build_parser().error("--a.OPTION / --b.OPTION belong to the agreement command")
    args.judge_tokens = tokens
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
