"""Simulated judges for the toy task: a rubric judge that errs, a holistic judge that sees every flaw.

`SimulatedJudge` stands in for a model judge in the ablation (`rdpo.dev.ablation.run`), so that the
outcome baseline is not blind by construction and the rubric judge is not perfect:

- rubric mode: the `RuleJudge` verdicts, each flipped with probability ``judge.noise``;
- outcome mode (``judge.outcome=holistic``): one 1-10 score per answer, from what a VLM looking
  at the image would see: the answer's facts checked against the scene (`rdpo.demo.truth`:
  wrong facts, hallucinations), minus a penalty for a terse answer (no full sentence) and for a
  rambling one (more than one sentence), mapped onto 1-10, plus Gaussian noise of SD
  ``judge.outcome_noise`` points, rounded and clipped: coarse and noisy, like a real one;
- rubric_holistic mode (``pairs.strategy=rubric_holistic``, `RuleJudge.rubric_holistic_many`
  over the noisy verdicts): one 1-10 score per answer from a judge that is shown the rubric but
  grades as a whole. It perceives each criterion exactly as the rubric judge does (the same
  noisy verdicts, the same flips) and then, instead of the checklist's rules, forms one
  impression: the weighted share of criteria met (essentials twice, additional criteria their
  weight; `rdpo.judging.judges.holistic_from_verdicts`), 1 + 9 x share rounded to an integer.
  So it knows what the rubric judge knows and errs where it errs; it lacks only the checklist
  structure: verdicts aggregated by rule (essentials first), a fine-grained score instead of
  ten levels, and the gate that never lets a response failing an essential criterion be chosen
  (a one-score strategy passes it vacuously). No score noise is added on top: the outcome
  judge's (SD 1.25 in the ablation) would make it the judge that agrees least with the ground
  truth (0.720 of pairs against 0.848 for the noisy rubric judge and 0.860 for the outcome
  judge, `calibrate`), mixing a noise level chosen here into what the arm measures.

Every random draw is a function of (run seed, prompt id, response, criterion), never of call
order: the same answer gets the same verdicts in every round, on every rank, after a resume.

`calibrate` measures, on a fixed set of answers (each prompt's reference and flawed answers),
how often each judge orders two answers of one prompt as the ground truth does (pairs the
truth ranks differently; a tie counts as a disagreement). ``python -m rdpo.simjudges`` prints it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import statistics
import sys
from collections.abc import Sequence

from rdpo.config import JudgeConfig, PairsConfig
from rdpo.judging.judges import RuleJudge
from rdpo.judging.scoring import score_response
from rdpo.pool import PromptRecord

STYLE_PENALTY = 0.25
"""What a terse or a rambling answer loses on the holistic judge's 0-1 quality scale."""


def _uniform(*key) -> random.Random:
    # random.Random(str) seeds from the string's SHA-512: the same on every machine and run.
    return random.Random("|".join(map(str, key)))


def style_flaws(text: str) -> tuple[bool, bool]:
    """(terse, rambling): no full sentence (under 3 words or no closing full stop), or more
    than one sentence."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return len(words) < 3 or not text.strip().endswith("."), len(sentences) > 1


class SimulatedJudge(RuleJudge):
    """`RuleJudge` with per-verdict errors (``cfg.noise``) and, with ``cfg.outcome=holistic``,
    a noisy holistic 1-10 score from the scene (`truth`, a `rdpo.demo.truth.GroundTruth`)."""

    name = "simulated"

    def __init__(self, cfg: JudgeConfig, *, truth=None, seed: int = 0,
                 strategy: str = PairsConfig.strategy) -> None:
        super().__init__(strategy)
        self.cfg, self.truth, self.seed = cfg, truth, seed

    def judge(self, record: PromptRecord, responses: Sequence[str]) -> list[dict[str, bool | None]]:
        out = super().judge(record, responses)
        if self.cfg.noise:
            for response, verdicts in zip(responses, out, strict=True):
                for cid, met in verdicts.items():
                    if met is not None and _uniform(self.seed, record.id, response, cid).random() \
                            < self.cfg.noise:
                        verdicts[cid] = not met
        return out

    def holistic(self, record_id: str, response: str) -> int:
        """The simulated holistic 1-10 score of one answer."""
        if self.truth is None:
            raise ValueError("judge.outcome=holistic reads the toy's scenes: set toy.enabled")
        terse, ramble = style_flaws(response)
        quality = self.truth.check(record_id, response).score - STYLE_PENALTY * (terse + ramble)
        noise = _uniform(self.seed, record_id, response, "holistic").gauss(0.0, 1.0)
        return min(10, max(1, round(1 + 9 * max(0.0, quality) + self.cfg.outcome_noise * noise)))

    def outcome(self, record: PromptRecord, responses: Sequence[str]) -> list[int | None]:
        if self.cfg.outcome != "holistic":
            return super().outcome(record, responses)
        return [self.holistic(record.id, r) for r in responses]


def make_simulated(cfg: JudgeConfig, toy, seed: int, strategy: str) -> RuleJudge:
    """The judge a rule `JudgeConfig` describes with its simulation keys: the exact `RuleJudge`
    when ``noise`` is 0 and ``outcome`` is ``check``, else a `SimulatedJudge` (`toy`: the
    ToyConfig whose ground truth the holistic judge reads; None without the toy)."""
    if not cfg.noise and cfg.outcome == "check":
        return RuleJudge(strategy)
    truth = None
    if cfg.outcome == "holistic" and toy is not None and toy.enabled:
        from rdpo.demo.truth import GroundTruth

        truth = GroundTruth.for_toy(toy)  # without it, outcome() fails and judge() still works
    return SimulatedJudge(cfg, truth=truth, seed=seed, strategy=strategy)


# -- calibration ---------------------------------------------------------------------------------

def answer_set(toy, draws: int = 2) -> list[tuple[PromptRecord, list[str]]]:
    """The fixed calibration set: every train prompt's reference and its flawed answers
    (`draws` draws of each flaw kind), distinct texts only."""
    from rdpo.demo import hardtoy
    from rdpo.demo import toy as easy
    from rdpo.pool import _Collector, check_rubric

    mod = hardtoy if toy.task == "hard" else easy
    draw = hardtoy.draw_records if toy.task == "hard" else easy._draw_records
    ids = [f"train-{i:05d}" for i in range(toy.n_train)]
    out = []
    for raw, _, _ in draw(ids, toy.task_seed):
        rng = random.Random(raw["id"])
        answers = dict.fromkeys([raw["reference"]] + [a for _ in range(draws)
                                                      for a in mod.flawed_answers(raw, rng)])
        problems: list = []
        rubric = check_rubric(raw["rubric"], _Collector(raw["id"], 0, problems))
        if problems:
            raise ValueError("\n".join(map(str, problems)))
        rec = PromptRecord(id=raw["id"], images=(), instruction=raw["instruction"], rubric=rubric,
                           reference=raw["reference"], outcome=raw["outcome"]["check"])
        out.append((rec, list(answers)))
    return out


def agreement(truth, items, scores: list[list[float]]) -> dict:
    """Over answer pairs of one prompt whose truth scores differ: the share a judge's `scores`
    order the same way (``agree``), tie (``ties``) or reverse."""
    agree = ties = n = 0
    for (rec, answers), judged in zip(items, scores, strict=True):
        t = [truth.check(rec.id, a).score for a in answers]
        for i, j in itertools.combinations(range(len(answers)), 2):
            if abs(t[i] - t[j]) < 1e-9:
                continue
            n += 1
            d = judged[i] - judged[j]
            ties += abs(d) < 1e-9
            agree += d * (t[i] - t[j]) > 1e-12
    return {"pairs": n, "agree": agree / max(1, n), "ties": ties / max(1, n)}


def calibrate(toy, cfg: JudgeConfig, seeds: Sequence[int] = (0,), draws: int = 2) -> dict:
    """Pairwise agreement with the ground truth of: the exact RuleJudge's rubric score, the
    noisy rubric judge (``cfg.noise``), the toy's outcome check, the holistic judge
    (``cfg.outcome_noise``) and the rubric_holistic judge (both noises), per seed and on average; ``holds``: the holistic judge agrees at
    least as often as the noisy rubric judge (on average over `seeds`)."""
    from dataclasses import replace

    from rdpo.demo.truth import GroundTruth

    truth, items = GroundTruth.for_toy(toy), answer_set(toy, draws)

    def rubric_scores(judge):
        return [[score_response(r.rubric, v).value for v in judge.judge(r, a)] for r, a in items]

    exact = RuleJudge()
    result = {"task": toy.task, "noise": cfg.noise, "outcome_noise": cfg.outcome_noise,
              "prompts": len(items), "answers": sum(len(a) for _, a in items),
              "rubric_exact": agreement(truth, items, rubric_scores(exact)),
              "outcome_check": agreement(truth, items, [exact.outcome(r, a) for r, a in items]),
              "per_seed": {}}
    for seed in seeds:
        sim = SimulatedJudge(replace(cfg, outcome="holistic"), truth=truth, seed=seed)
        result["per_seed"][seed] = {
            "rubric_noisy": agreement(truth, items, rubric_scores(sim)),
            "outcome_holistic": agreement(truth, items, [sim.outcome(r, a) for r, a in items]),
            "rubric_holistic": agreement(truth, items, sim.rubric_holistic_many(items))}
    for key in ("rubric_noisy", "outcome_holistic", "rubric_holistic"):
        result[key] = {k: statistics.fmean(s[key][k] for s in result["per_seed"].values())
                       for k in ("pairs", "agree", "ties")}
    result["holds"] = result["outcome_holistic"]["agree"] >= result["rubric_noisy"]["agree"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rdpo.simjudges",
                                     description="Calibration of the simulated judges: pairwise "
                                     "agreement with the toy's ground truth (JSON).")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. toy.task=hard judge.noise=0.1")
    args = parser.parse_args(argv)
    from rdpo.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, ["run.dir=unused", *args.overrides])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = calibrate(cfg.toy, cfg.judge, args.seeds)
    print(json.dumps(result, indent=2))
    return 0 if result["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
