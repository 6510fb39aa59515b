"""The outcome baseline: one holistic verdict per response, pairs from it, and a short fit."""

import dataclasses
import json
import random

import pytest

from rdpo.config import load_config
from rdpo.demo import toy
from rdpo.fit import fit
from rdpo.judging.judges import OUTCOME_FAIL, OUTCOME_PASS, RuleJudge
from rdpo.pool import load_pool
from rdpo.rollout import Rollout
from rdpo.rounds import outcome_score, score_rollouts, select_pairs


def test_rule_outcome_on_toy(toy_pools):
    judge = RuleJudge()
    raws = [json.loads(x) for x in toy_pools.train.read_text().splitlines()]
    for raw, record in zip(raws, load_pool(toy_pools.train), strict=True):
        hallucinate, wrong, _, ramble = toy.flawed_answers(raw, random.Random(0))
        scores = judge.outcome(record, [record.reference, hallucinate, wrong, ramble])
        # the main answer is right in all but `wrong`; the hallucinated extra goes unnoticed
        assert scores == [OUTCOME_PASS, OUTCOME_PASS, OUTCOME_FAIL, OUTCOME_PASS], record.id
        # ...whereas the rubric catches it
        verdicts = judge.judge(record, [hallucinate])[0]
        assert False in verdicts.values()
    no_outcome = dataclasses.replace(record, outcome=None)
    assert judge.outcome(no_outcome, ["x", "y"]) == [None, None]


def test_outcome_pairs_use_the_same_rules(toy_pools):
    records = load_pool(toy_pools.train)[:3]
    raws = [json.loads(x) for x in toy_pools.train.read_text().splitlines()][:3]
    rng = random.Random(1)
    rollouts = [
        Rollout(records[0], [toy.flawed_answers(raws[0], rng)[1], records[0].reference]),
        Rollout(records[1], [records[1].reference, records[1].reference + " "]),  # tie
        Rollout(dataclasses.replace(records[2], outcome=None), ["a", "b"]),  # unknown
    ]
    scored = score_rollouts(RuleJudge(strategy="outcome"), rollouts, "lexicographic")
    assert scored[0].verdicts == [{"outcome": 1}, {"outcome": 10}]
    assert [s.value for s in scored[0].scores] == [0.0, 1.0]
    assert scored[2].scores[0].unknown_essential == 1
    selection = select_pairs(scored, min_margin=0.1, require_chosen_essential=True)
    assert [(p.prompt_id, p.chosen_index, p.rejected_index) for p in selection.pairs] == [
        (records[0].id, 1, 0)]
    assert selection.dropped["tie"] == 1 and selection.dropped["too_few_eligible"] == 1
    # an explicit strategy wins over the judge's own
    rubric = score_rollouts(RuleJudge(strategy="outcome"), rollouts[:1], "lexicographic",
                            strategy="rubric")
    assert "outcome" not in rubric[0].verdicts[0]
    assert outcome_score(None).unknown == 1 and outcome_score(10).essential_pass is True


@pytest.mark.slow
def test_fit_with_outcome_strategy(small_toy, tmp_path):
    cfg = load_config("configs/quickstart.yaml", [
        *small_toy.overrides, f"run.dir={tmp_path / 'run'}", "pairs.strategy=outcome",
        "dpo.max_steps=2", "rollout.every_n_steps=2", "eval.samples_per_prompt=1",
        "eval.max_prompts=4"])
    result = fit(cfg)
    rows = [json.loads(x) for x in (result.run_dir / "rounds/0000/rollouts.jsonl").open()]
    assert len(rows) == 16 * 4
    assert all(set(r["verdicts"]) == {"outcome"} for r in rows)
    assert all(r["verdicts"]["outcome"] in (OUTCOME_PASS, OUTCOME_FAIL) for r in rows)
    # the held-out evaluation stays the rubric score, comparable with a rubric-trained run
    assert 0.0 <= result.eval["after"]["rubric_score"] <= 1.0
    assert result.eval["after"]["prompts"] == 4
