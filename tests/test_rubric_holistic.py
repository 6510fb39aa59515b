"""pairs.strategy=rubric_holistic: one 1-10 score per response from a judge shown the rubric as
context (no per-criterion verdicts): the exact and the simulated rule judge, the chat prompt
and its cache key, scoring and pairs, and a short fit."""

import json
import random

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.config import JudgeConfig, load_config
from rdpo.demo import toy
from rdpo.demo.simjudges import SimulatedJudge
from rdpo.judging.cache import judgment_key
from rdpo.judging.judges import (
    OUTCOME_SYSTEM,
    TEMPLATE_VERSION,
    OpenAIJudge,
    RuleJudge,
    holistic_from_verdicts,
    holistic_request,
    outcome_request,
)
from rdpo.pool import Criterion, PromptRecord, Rubric, load_pool
from rdpo.rollout import Rollout
from rdpo.rounds import score_rollouts, select_pairs

RUBRIC = Rubric(essential=(Criterion("E1", "Says red.", check={"any": ["red"]}),
                           Criterion("E2", "Says circle.", check={"any": ["circle"]})),
                additional=(Criterion("A1", "Says one.", 1.0, {"any": ["one"]}),
                            Criterion("A2", "No triangle.", 0.5, {"none": ["triangle"]})))


def test_score_is_the_weighted_share_of_criteria_met():
    """1 + 9 x (2 x essentials met + additional weights met) / (2 x 2 + 1.5), rounded."""
    def h(e1, e2, a1, a2, noise=0.0):
        return holistic_from_verdicts(RUBRIC, {"E1": e1, "E2": e2, "A1": a1, "A2": a2}, noise)

    assert h(True, True, True, True) == 10 and h(False, False, False, False) == 1
    assert h(True, False, True, False) == 6        # 3 / 5.5 -> 5.91
    assert h(True, True, None, None) == 8          # 4 / 5.5 -> 7.55: unknown counts as not met
    assert h(False, False, True, True) == 3        # 1.5 / 5.5 -> 3.45: no essential gate
    assert h(True, False, True, False, 0.6) == 7   # 6.51
    assert h(True, True, True, True, 3.0) == 10 and h(False, False, False, False, -3.0) == 1
    assert h(None, None, None, None) is None       # nothing known: no score


def test_rule_judges_score_their_own_verdicts():
    record = PromptRecord("p", (), "What is it?", RUBRIC)
    responses = ["one red circle", "a red triangle", "nothing"]
    # all met; 2 / 5.5 -> 4.27; 0.5 / 5.5 (no triangle) -> 1.82
    assert RuleJudge().rubric_holistic_many([(record, responses)]) == [[10, 4, 2]]
    # the simulated judge scores its noisy verdicts: the same flips as its rubric verdicts
    cfg = JudgeConfig(noise=0.5, outcome="holistic")
    sim = SimulatedJudge(cfg, seed=3)
    verdicts = sim.judge(record, responses)
    assert verdicts != RuleJudge().judge(record, responses)  # some flipped at noise 0.5
    assert sim.rubric_holistic_many([(record, responses)]) == [
        [holistic_from_verdicts(RUBRIC, v) for v in verdicts]]


def test_scored_and_paired_like_outcome(toy_pools):
    records = load_pool(toy_pools.train)[:2]
    raws = [json.loads(x) for x in toy_pools.train.read_text().splitlines()][:2]
    wrong = toy.flawed_answers(raws[0], random.Random(1))[1]
    rollouts = [Rollout(records[0], [wrong, records[0].reference]),
                Rollout(records[1], [records[1].reference, records[1].reference])]
    scored = score_rollouts(RuleJudge(strategy="rubric_holistic"), rollouts, "lexicographic")
    assert scored[0].verdicts[1] == {"rubric_holistic": 10}
    low = scored[0].verdicts[0]["rubric_holistic"]
    assert 1 <= low < 10 and scored[0].scores[0].value == pytest.approx((low - 1) / 9)
    # one score: no essential verdicts, the gate passes vacuously
    assert all(s.essential_pass is True for s in scored[0].scores)
    selection = select_pairs(scored, min_margin=0.1, require_chosen_essential=True)
    assert [(p.prompt_id, p.chosen_index) for p in selection.pairs] == [(records[0].id, 1)]
    assert selection.dropped["tie"] == 1
    with pytest.raises(ValueError, match="is not one of rubric, outcome, rubric_holistic"):
        score_rollouts(RuleJudge(), rollouts, "lexicographic", strategy="holistic")


def test_chat_prompt_and_cache_key_differ_from_outcome(toy_pools, tmp_path):
    record = load_pool(toy_pools.train)[0]
    req = holistic_request(record, "A red <circle>.", max_chars=100)
    for c in record.rubric.essential:
        assert f"- {c.text}\n" in req.text
    for c in record.rubric.additional:
        assert f"- {c.text} (weight {c.weight:g})" in req.text
    assert "[E1]" not in req.text and '"verdicts"' not in req.system + req.text
    assert req.text.endswith("<<<RESPONSE\nA red &lt;circle&gt;.\nRESPONSE>>>")
    assert '{"score": N}' in req.system and req.system != OUTCOME_SYSTEM
    identity = {"chat": {"model": "m"}, "template": TEMPLATE_VERSION, "parser": 2}
    assert TEMPLATE_VERSION >= 3
    assert judgment_key(identity, req) != judgment_key(
        identity, outcome_request(record, "A red <circle>.", max_chars=100))

    cache = tmp_path / "cache.sqlite"
    with FakeOpenAIServer(score=8) as srv:
        cfg = JudgeConfig(kind="openai", model=srv.model, base_url=srv.url, cache=str(cache))
        judge = OpenAIJudge(cfg, strategy="rubric_holistic")
        rollout = Rollout(record, ["A red circle.", "A blue square."])
        scored = score_rollouts(judge, [rollout], "lexicographic")
        assert scored[0].verdicts == [{"rubric_holistic": 8}, {"rubric_holistic": 8}]
        assert srv.problems == [] and srv.request_count == 2
        assert all("Essential criteria:" in r.text for r in srv.requests)
        # the outcome question about the same answers is not answered from that cache
        assert OpenAIJudge(cfg).outcome(record, ["A red circle."]) == [8]
        assert srv.request_count == 3
        assert OpenAIJudge(cfg).rubric_holistic_many([(record, ["A red circle."])]) == [[8]]
        assert srv.request_count == 3  # cached


@pytest.mark.slow
def test_fit_with_rubric_holistic(small_toy, tmp_path):
    from rdpo.fit import fit

    cfg = load_config("configs/quickstart.yaml", [
        *small_toy.overrides, f"run.dir={tmp_path / 'run'}", "pairs.strategy=rubric_holistic",
        "dpo.max_steps=2", "rollout.every_n_steps=2", "data.heldout_pool=null"])
    result = fit(cfg)
    rows = [json.loads(x) for x in
            (result.run_dir / "rounds/0000/rollouts.jsonl").read_text().splitlines()]
    assert rows and all(set(r["verdicts"]) == {"rubric_holistic"} for r in rows)
    assert all(1 <= r["verdicts"]["rubric_holistic"] <= 10 for r in rows)
    assert {r["score"] for r in rows} == {(r["verdicts"]["rubric_holistic"] - 1) / 9 for r in rows}
