"""What a run costs (rdpo.cost, issue 26 §1): prices, the per-round rows summed over ranks, the
chat backends' token counts against the scripted server's ``usage``, cache hits on a second
pass, the rubric builder's cost file, resume bookkeeping; slow: cost.json of the quickstart
(rule judge) against its round files, of a run judged by the scripted server against the
server's own counts, and of a run killed between a round and its checkpoint against the same
run uninterrupted."""

import csv
import json
import logging
import shutil
import signal

import pytest
from fake_openai_server import FakeOpenAIServer
from small_toy import QUICKSTART

from rdpo.config import JudgeConfig, load_config
from rdpo.cost import COUNTS, CostLedger, Prices, RoundCost, judge_counters, round_row
from rdpo.judging.chat import ChatRequest, TransformersChat, _Prompts
from rdpo.judging.judges import OpenAIJudge, RuleJudge
from rdpo.pool import PromptRecord, load_pool
from rdpo.tools.rubrics import main as rubrics_main

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


def test_prices_unknown_is_not_free():
    assert Prices().money(0, 0) == 0.0  # nothing spent costs nothing, price or not
    assert Prices().money(10, 0) is None and Prices(1.0, None).money(10, 5) is None
    assert Prices(2.0, 8.0).money(1_000_000, 500_000) == pytest.approx(6.0)
    assert Prices(2.0, None).money(500_000, 0) == pytest.approx(1.0)


def test_round_row_sums_counts_and_takes_the_slowest_rank():
    parts = [{**{k: 1 for k in COUNTS[:8]}, "seconds": {"sampling": 2.0, "judging": 1.0}},
             {**{k: 2 for k in COUNTS[:8]}, "seconds": {"sampling": 3.0, "reference": 0.5}}]
    row = round_row(4, 40, parts, responses=64, tokens=900, pairs_kept=7)
    assert row["judge_requests"] == row["audit_completion_tokens"] == 3
    assert (row["responses"], row["sampled_tokens"], row["pairs_kept"]) == (64, 900, 7)
    assert row["seconds"] == {"sampling": 3.0, "judging": 1.0, "reference": 0.5, "audit": 0.0,
                              "training": 0.0}
    assert judge_counters(RuleJudge()) == {"requests": 0, "cache_hits": 0, "prompt_tokens": 0,
                                           "completion_tokens": 0}


def _row(index, tokens, pairs, prompt=0, completion=0, training=0.0):
    row = round_row(index, 2 * index, [{**dict.fromkeys(COUNTS[:8], 0), "seconds": {}}],
                    responses=8, tokens=tokens, pairs_kept=pairs)
    row.update(judge_requests=4, judge_prompt_tokens=prompt, judge_completion_tokens=completion)
    row["seconds"]["training"] = training
    return row


def test_ledger_money_totals_and_file(tmp_path):
    ledger = CostLedger(tmp_path / "cost.json", Prices(2.0, 10.0))
    ledger.put(_row(0, 100, 4, prompt=1_000_000, completion=100_000))
    ledger.put(_row(1, 50, 0, prompt=500_000))
    ledger.add_training(1, 1.5)
    ledger.add_outside({"judge_requests": 2, "judge_prompt_tokens": 10})
    ledger.write()
    doc = json.loads((tmp_path / "cost.json").read_text())
    assert [r["money"]["total"] for r in doc["rounds"]] == pytest.approx([3.0, 1.0])
    assert doc["rounds"][0]["money"]["per_pair"] == pytest.approx(0.75)
    assert doc["rounds"][1]["money"]["per_pair"] is None  # no pair kept: no price per pair
    t = doc["total"]
    assert (t["rounds"], t["sampled_tokens"], t["pairs_kept"], t["judge_requests"]) == (2, 150, 4, 8)
    assert t["seconds"]["training"] == 1.5 and t["money"]["per_pair"] == pytest.approx(1.0)
    assert doc["spent"]["judge_requests"] == 10 and doc["outside_rounds"]["judge_requests"] == 2
    assert doc["prices"] == {"judge": {"input_per_mtok": 2.0, "output_per_mtok": 10.0},
                             "audit": None}


def test_resume_keeps_the_checkpoints_rows_and_moves_the_rest_to_redone(tmp_path):
    """Killed after round 1 was written to cost.json but before its checkpoint: the resumed
    run starts from round 0's checkpoint (1 s of training then), builds round 1 again; its rows
    then equal the uninterrupted run's, and what the killed run spent is under redone."""
    path = tmp_path / "cost.json"
    first = CostLedger(path)
    first.put(_row(0, 100, 4))
    first.add_training(0, 1.0)
    checkpoint = first.state()
    first.add_training(0, 2.0)
    first.put(_row(1, 60, 3))
    first.write()
    resumed = CostLedger(path)
    resumed.load(checkpoint)
    resumed.continue_file()
    resumed.put(_row(1, 60, 3))
    resumed.write()
    doc = json.loads(path.read_text())
    assert [r["sampled_tokens"] for r in doc["rounds"]] == [100, 60]
    assert doc["total"]["pairs_kept"] == 7 and doc["total"]["judge_requests"] == 8
    assert doc["redone"]["rounds"] == [1] and doc["redone"]["sampled_tokens"] == 60
    assert doc["redone"]["seconds"]["training"] == pytest.approx(2.0)
    assert doc["spent"]["sampled_tokens"] == 220 and doc["spent"]["judge_requests"] == 12
    # A second resume from the same checkpoint keeps the first one's redone work.
    again = CostLedger(path)
    again.load(checkpoint)
    again.continue_file()
    assert again.redone["rounds"] == [1, 1] and again.redone["sampled_tokens"] == 120


def test_openai_judge_counts_the_servers_usage_and_its_cache_hits(tmp_path, records):
    items = [(r, ["The circle is red.", "Two shapes."]) for r in records[:3]]
    cfg = dict(kind="openai", model="fake-judge", cache=str(tmp_path / "c.sqlite"))
    with FakeOpenAIServer(faults=["malformed"]) as srv:
        judge = OpenAIJudge(JudgeConfig(base_url=srv.url, **cfg))
        cost = RoundCost(judge)
        judge.judge_many(items)
        part = cost.part()
        usage = srv.usage
        # 6 judgments, one asked again after an unreadable answer: 7 requests, all counted
        assert part["judge_requests"] == srv.request_count == 7
        assert part["judge_prompt_tokens"] == usage["prompt_tokens"] > 7 * 85
        assert part["judge_completion_tokens"] == usage["completion_tokens"] > 7
        assert part["judge_cache_hits"] == 0 and part["audit_requests"] == 0
        again = OpenAIJudge(JudgeConfig(base_url=srv.url, **cfg))  # a second pass, same cache
        cost = RoundCost(again)
        again.judge_many(items)
        assert cost.part()["judge_cache_hits"] == 6 and cost.part()["judge_requests"] == 0
        assert cost.part()["judge_prompt_tokens"] == 0 and srv.request_count == 7


def test_a_server_without_usage_counts_zero_once_warned(records, caplog):
    with FakeOpenAIServer() as srv, caplog.at_level(logging.WARNING, "rdpo"):
        srv.configure(usage=False)
        judge = OpenAIJudge(JudgeConfig(kind="openai", model=srv.model, base_url=srv.url,
                                        cache=None))
        judge.judge_many([(records[0], ["a", "b", "c"])])
        assert judge.counters() == {"requests": 3, "cache_hits": 0, "prompt_tokens": 0,
                                    "completion_tokens": 0}
    assert caplog.text.count("reports no token usage") == 1


def test_transformers_chat_counts_with_its_own_tokenizer(tiny_model_and_processor, records):
    model, processor = tiny_model_and_processor
    chat = TransformersChat((model, processor), batch_size=2, max_new_tokens=6)
    requests = [ChatRequest(r.images, f"Question {i}: {r.instruction}", "Grade it.")
                for i, r in enumerate(records[:3])]
    answers = chat.complete(requests)
    prompts = _Prompts(processor, requests)  # the prompts as the judge encodes them
    assert len(answers) == len(chat.usage.last) == 3
    for i, used in enumerate(chat.usage.last):
        record = PromptRecord(id=str(i), images=tuple(requests[i].images), instruction="",
                              rubric=records[0].rubric)
        assert used.prompt_tokens == prompts.get(record)["input_ids"].shape[-1] > 10
        assert 1 <= used.completion_tokens <= 6 and used.seconds > 0
    totals = chat.usage.totals()
    assert totals["answers"] == 3
    assert totals["prompt_tokens"] == sum(u.prompt_tokens for u in chat.usage.last)


def test_rubric_build_records_tokens_and_seconds(toy_pools, tmp_path, capsys):
    prompts = toy_pools.train.parent / f"prompts-{tmp_path.name}.jsonl"  # beside the images
    lines = [json.loads(x) for x in toy_pools.train.read_text().splitlines()][:4]
    prompts.write_text("".join(json.dumps({k: r[k] for k in ("id", "images", "instruction")})
                               + "\n" for r in lines))
    out = tmp_path / "pool.jsonl"
    args = ["build", "--input", str(prompts), "--out", str(out), "--kind", "openai",
            "--concurrency", "2", "--timeout", "5", "--max-retries", "0", "--no-progress"]
    with FakeOpenAIServer(faults=["invalid_rubric"]) as srv:
        assert rubrics_main([*args, "--model", srv.model, "--base-url", srv.url]) == 0
        usage, sent = srv.usage, srv.request_count
    cost = json.loads((tmp_path / "pool.jsonl.cost.json").read_text())
    # the record whose first answer was not a valid rubric was asked twice, then built
    assert sorted(r["requests"] for r in cost["records"].values()) == [1, 1, 1, 2]
    assert all(r["built"] and r["prompt_tokens"] > 85 for r in cost["records"].values())
    total = cost["total"]
    assert (total["requests"], total["records"], total["built"]) == (sent, 4, 4) == (5, 4, 4)
    assert total["prompt_tokens"] == usage["prompt_tokens"]
    assert total["completion_tokens"] == usage["completion_tokens"]
    assert total["seconds"] > 0 and total["wall_seconds"] >= total["seconds"] / 2
    assert total["per_built_record"]["requests"] == pytest.approx(5 / 4)
    assert "5 requests" in capsys.readouterr().out
    # A re-run builds nothing new: the counts stay.
    with FakeOpenAIServer() as srv:
        assert rubrics_main([*args, "--model", srv.model, "--base-url", srv.url]) == 0
    assert json.loads((tmp_path / "pool.jsonl.cost.json").read_text())["total"]["requests"] == 5


# -- end to end ------------------------------------------------------------------------------

def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _file_counts(run_dir, index):
    """(responses, token ids, kept pairs) of a round as its files hold them."""
    rows = _jsonl(run_dir / f"rounds/{index:04d}/rollouts.jsonl")
    pairs = _jsonl(run_dir / f"rounds/{index:04d}/pairs.jsonl")[:-1]
    return len(rows), sum(len(r["token_ids"]) for r in rows), len(pairs)


@slow
def test_quickstart_cost_matches_its_round_files(small_toy, tmp_path):
    from rdpo.fit import fit

    cfg = load_config(QUICKSTART, [*small_toy.overrides, f"run.dir={tmp_path / 'run'}",
                                   "dpo.max_steps=4", "rollout.every_n_steps=2"])
    run = fit(cfg).run_dir
    doc = json.loads((run / "cost.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    for row in doc["rounds"]:
        assert (row["responses"], row["sampled_tokens"], row["pairs_kept"]) == \
            _file_counts(run, row["round"])
        assert row["sampled_tokens"] > row["responses"]  # a token per response at least
        # the rule judge asks nobody: no request, no token, nothing to pay
        assert all(row[k] == 0 for k in COUNTS[:8]) and row["money"]["total"] == 0.0
        assert all(row["seconds"][k] > 0 for k in ("sampling", "judging", "training"))
    total = doc["total"]
    assert total["sampled_tokens"] == sum(r["sampled_tokens"] for r in doc["rounds"])
    assert doc["redone"]["rounds"] == [] and doc["spent"]["sampled_tokens"] == \
        total["sampled_tokens"]
    metrics = list(csv.DictReader((run / "logs/metrics.csv").open()))
    logged = [float(r["round/cost/sampled_tokens"]) for r in metrics
              if r.get("round/cost/sampled_tokens")]
    assert logged == [r["sampled_tokens"] for r in doc["rounds"]]
    assert sum(1 for r in metrics if r.get("round/cost/seconds/training")) == 2
    assert "What the rounds cost" in (run / "report.md").read_text()
    print("quickstart cost.json total:", json.dumps(total))


@slow
def test_openai_judge_tokens_equal_the_servers_usage(small_toy, tmp_path):
    from rdpo.fit import fit

    paths = small_toy.paths
    with FakeOpenAIServer(judging="rule", pools=[paths.train_pool, paths.heldout_pool]) as srv:
        cfg = load_config(QUICKSTART, [
            *small_toy.overrides, f"run.dir={tmp_path / 'run'}", "dpo.max_steps=2",
            "rollout.every_n_steps=2", "eval.max_prompts=2", *srv.judge_overrides(4),
            "judge.price_input_per_mtok=0.5", "judge.price_output_per_mtok=2"])
        run = fit(cfg).run_dir
        usage, sent = srv.usage, srv.request_count
    doc = json.loads((run / "cost.json").read_text())
    spent = doc["spent"]  # the round and the held-out evaluation (before and after)
    assert spent["judge_requests"] == sent > doc["total"]["judge_requests"] > 0
    assert spent["judge_prompt_tokens"] == usage["prompt_tokens"]
    assert spent["judge_completion_tokens"] == usage["completion_tokens"]
    row = doc["rounds"][0]
    money = (row["judge_prompt_tokens"] * 0.5 + row["judge_completion_tokens"] * 2) / 1e6
    assert row["money"]["total"] == pytest.approx(money) and money > 0
    assert row["money"]["per_pair"] == pytest.approx(money / row["pairs_kept"])
    # one request per distinct response (K identical samples are asked once)
    assert 0 < row["judge_requests"] <= row["responses"]


@slow
def test_a_kill_between_a_round_and_its_checkpoint_is_not_counted_twice(small_toy, tmp_path):
    """Run A uninterrupted; run B killed after step 3 (checkpoint of step 2 kept aside),
    resumed and killed after step 5 (round 1 in cost.json), then resumed from the step-2
    checkpoint, as if the kill had come between round 1's files and its checkpoint. B's rounds
    cost what A's did (seconds aside); the killed round 1 is under redone."""
    from scale_runs import fit_cli, log_text

    extra = ["run.checkpoint_every_n_steps=2", "run.resume=auto"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert fit_cli(a, small_toy.cache, *extra).returncode == 0, log_text(a)
    assert fit_cli(b, small_toy.cache, *extra, kill_at_step=3).returncode == -signal.SIGKILL
    shutil.copy(b / "checkpoints/last.ckpt", tmp_path / "step2.ckpt")
    assert fit_cli(b, small_toy.cache, *extra, kill_at_step=5).returncode == -signal.SIGKILL
    killed = json.loads((b / "cost.json").read_text())
    assert [r["round"] for r in killed["rounds"]] == [0, 1]
    shutil.copy(tmp_path / "step2.ckpt", b / "checkpoints/last.ckpt")
    assert fit_cli(b, small_toy.cache, *extra).returncode == 0, log_text(b)
    cost_a, cost_b = (json.loads((d / "cost.json").read_text()) for d in (a, b))
    for row_a, row_b in zip(cost_a["rounds"], cost_b["rounds"], strict=True):
        assert {k: row_a[k] for k in COUNTS} == {k: row_b[k] for k in COUNTS}
        assert (row_b["responses"], row_b["sampled_tokens"], row_b["pairs_kept"]) == \
            _file_counts(b, row_b["round"])
    assert {k: cost_a["total"][k] for k in COUNTS} == {k: cost_b["total"][k] for k in COUNTS}
    assert cost_b["redone"]["rounds"] == [1]
    assert cost_b["redone"]["sampled_tokens"] == killed["rounds"][1]["sampled_tokens"] > 0
    assert cost_b["spent"]["sampled_tokens"] == \
        cost_a["total"]["sampled_tokens"] + killed["rounds"][1]["sampled_tokens"]
