"""The audit judge's watch (judge.audit, issue 26 §4): which pairs are audited, agreement and
margins against the training judge, the warning rule, judge_audit.json across a resume, the
config section; slow: a run with a noisy rule judge audited by the scripted OpenAI server."""

import csv
import json
from dataclasses import dataclass

import pytest
from fake_openai_server import FakeOpenAIServer
from small_toy import QUICKSTART

from rdpo.config import ConfigError, load_config
from rdpo.judging.audit import AuditLog, audit_round, audit_sample, summarize, watch
from rdpo.judging.judges import RuleJudge
from rdpo.judging.scoring import score_response
from rdpo.pairs import Pair
from rdpo.pool import load_pool


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


def _pairs(n):
    return [Pair(f"p{i}", "c", "r", 0, 1, 1.0, 0.0) for i in range(n)]


def test_the_sample_is_a_fraction_chosen_by_hash():
    pairs = _pairs(10)
    got = audit_sample(pairs, 0.25, seed=0, round_index=3)
    assert len(got) == 3 and [p for p in pairs if p in got] == got  # ceil(2.5), in order
    assert audit_sample(list(reversed(pairs)), 0.25, seed=0, round_index=3)[::-1] == got
    assert audit_sample(pairs, 0.25, seed=0, round_index=4) != got  # another round, others
    assert len(audit_sample(pairs[:1], 0.01, seed=0, round_index=0)) == 1  # at least one
    assert audit_sample([], 0.5, seed=0, round_index=0) == []
    assert audit_sample(pairs, 1.0, seed=0, round_index=0) == pairs


@dataclass
class _Rollout:
    record: object
    responses: list


@dataclass
class _Scored:
    rollout: _Rollout
    verdicts: list


def test_audit_round_compares_verdicts_and_scores(records):
    """Training verdicts with one flip against the exact rule judge as the audit."""
    record = next(r for r in records if len([c for c in r.rubric.criteria() if c.check]) >= 2)
    rule = RuleJudge()
    responses = [record.reference or "x", "no idea"]
    truth = rule.judge(record, responses)
    flipped = [dict(v) for v in truth]
    cid = next(c.id for c in record.rubric.criteria() if c.check)
    flipped[1][cid] = not flipped[1][cid]
    scored = [_Scored(_Rollout(record, responses), flipped)]
    scores = [score_response(record.rubric, v, "lexicographic").value for v in flipped]
    pair = Pair(record.id, responses[0], responses[1], 0, 1, scores[0], scores[1])
    [got] = audit_round(rule, scored, [pair], "lexicographic")
    known = sum(v is not None for v in truth[0].values()) + sum(
        v is not None for v in truth[1].values())
    assert got["verdicts_compared"] == known and got["verdicts_agree"] == known - 1
    assert got["audit_verdicts"] == truth
    assert got["audit_scores"] == [score_response(record.rubric, v, "lexicographic").value
                                   for v in truth]
    row = summarize(2, 20, [got])
    assert row["verdict_agreement"] == pytest.approx((known - 1) / known)
    assert row["train_margin"] == pytest.approx(scores[0] - scores[1])
    assert row["pair_agreement"] == float(got["audit_scores"][0] > got["audit_scores"][1])
    empty = summarize(3, 30, [])
    assert empty["pairs"] == 0 and empty["pair_agreement"] is None


def _row(i, train, audit, train_score=0.5, audit_score=0.5, pairs=4):
    return {"round": i, "pairs": pairs, "train_margin": train, "audit_margin": audit,
            "train_score": train_score, "audit_score": audit_score}


def test_the_watch_warns_when_only_the_training_judge_climbs():
    climbing = [_row(0, 0.40, 0.40), _row(1, 0.45, 0.39), _row(2, 0.50, 0.41)]
    message = watch(climbing)
    assert "from round 0 to round 2" in message and "margin +0.100" in message
    assert "score" not in message.split("judge's")[1].split("(")[0]
    assert watch(climbing[:2]) is None  # fewer than 3 audited rounds
    following = [_row(0, 0.40, 0.40), _row(1, 0.45, 0.43), _row(2, 0.50, 0.46)]
    assert watch(following) is None  # the audit judge rose 0.06 >= half of 0.10
    assert watch([_row(0, 0.40, 0.4), _row(1, 0.42, 0.4), _row(2, 0.44, 0.4)]) is None  # +0.04
    scores = [_row(i, 0.4, 0.4, train_score=0.3 + 0.1 * i, audit_score=0.3) for i in range(3)]
    assert "score +0.200 by the training judge vs +0.000" in watch(scores)
    # rounds without an audited pair do not count toward the window
    gap = [climbing[0], _row(1, None, None, pairs=0), climbing[1]]
    assert watch(gap) is None and watch([*gap, climbing[2]]) is not None


def test_audit_log_replaces_a_redone_round_and_its_warning(tmp_path):
    log = AuditLog(tmp_path / "judge_audit.json", "rule", 0.5)
    for row in (_row(0, 0.40, 0.40), _row(1, 0.45, 0.39)):
        assert log.put(row) is None
    state = log.state()
    assert log.put(_row(2, 0.50, 0.41)) is not None and len(log.warnings) == 1
    log.write()
    assert json.loads((tmp_path / "judge_audit.json").read_text())["warnings"][0]["round"] == 2
    resumed = AuditLog(tmp_path / "judge_audit.json", "rule", 0.5)
    resumed.load(state)  # the checkpoint before round 2; round 2 is built again, and follows
    assert resumed.put(_row(2, 0.50, 0.47)) is None and resumed.warnings == []
    assert [r["round"] for r in resumed.rows] == [0, 1, 2]


def test_the_audit_section_is_checked(tmp_path):
    base = ["run.dir=" + str(tmp_path), "toy.enabled=false", "model.path=m",
            "data.train_pool=p.jsonl"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, "judge.audit.kind=openai", "judge.audit.audit.kind=rule",
                           "judge.audit_fraction=0"])
    text = str(err.value)
    assert "judge.audit.model: an openai judge needs a model" in text
    assert "judge.audit.base_url" in text and "judge.audit_fraction: must be in (0, 1]" in text
    assert "judge.audit.audit, judge.audit.audit_fraction: an audit judge has no audit" in text
    cfg = load_config(None, [*base, "judge.audit.kind=rule", "judge.audit.noise=0.1"])
    assert cfg.judge.audit.noise == 0.1 and cfg.judge.audit.cache == f"{tmp_path}/judge_cache.sqlite"
    assert load_config(None, base).judge.audit is None


@pytest.mark.slow
def test_a_run_audited_by_the_scripted_server(small_toy, tmp_path):
    """Training judge: the rule judge with 30 % of its verdicts flipped; audit judge: the
    scripted server grading by the same rules (it now and then omits a criterion), on half of
    each round's pairs. The audit files hold ceil(pairs / 2) audited pairs per round, the audit
    judge's tokens in cost.json are what the server counted, and the metrics are logged."""
    from rdpo.fit import fit

    paths = small_toy.paths
    with FakeOpenAIServer(judging="rule", pools=[paths.train_pool]) as srv:
        cfg = load_config(QUICKSTART, [
            *small_toy.overrides, f"run.dir={tmp_path / 'run'}", "dpo.max_steps=4",
            "rollout.every_n_steps=2", "judge.noise=0.3", "judge.audit_fraction=0.5",
            *(o.replace("judge.", "judge.audit.") for o in srv.judge_overrides(4)),
            "judge.audit.price_input_per_mtok=1", "judge.audit.price_output_per_mtok=4"])
        run = fit(cfg).run_dir
        usage, sent = srv.usage, srv.request_count
    doc = json.loads((run / "judge_audit.json").read_text())
    assert doc["judge"] == "fake-judge" and doc["fraction"] == 0.5
    cost = json.loads((run / "cost.json").read_text())
    for row, cost_row in zip(doc["rounds"], cost["rounds"], strict=True):
        audited = json.loads((run / f"rounds/{row['round']:04d}/judge_audit.json").read_text())
        assert row["pairs"] == len(audited["audited"]) == -(-cost_row["pairs_kept"] // 2) > 0
        assert 0.0 <= row["verdict_agreement"] < 1.0  # 30 % flips: some disagreement
        assert cost_row["audit_requests"] <= 2 * row["pairs"]
        money = (cost_row["audit_prompt_tokens"] + 4 * cost_row["audit_completion_tokens"]) / 1e6
        assert money > 0 and cost_row["money"]["audit"] == pytest.approx(money)
        assert cost_row["judge_requests"] == 0  # the training judge is the rule judge
    assert cost["spent"]["audit_requests"] == sent  # the audit judge asked nothing else
    assert cost["spent"]["audit_prompt_tokens"] == usage["prompt_tokens"]
    assert cost["spent"]["audit_completion_tokens"] == usage["completion_tokens"]
    metrics = list(csv.DictReader((run / "logs/metrics.csv").open()))
    logged = [float(r["round/audit/pairs"]) for r in metrics if r.get("round/audit/pairs")]
    assert logged == [r["pairs"] for r in doc["rounds"]]
    report = (run / "report.md").read_text()
    assert "Audit judge `fake-judge`" in report and "Criterion pass rates across rounds" in report
    print("audit rows:", json.dumps(doc["rounds"]))
