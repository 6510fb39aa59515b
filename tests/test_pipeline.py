"""The pipelined round (rollout.pipeline): judging runs while the round samples, reference
passes as judged prompts yield pairs, and the results are the sequential round's, byte for byte."""

import csv
import json
import threading
import time

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.config import load_config
from rdpo.fit import fit
from rdpo.judging.judges import RuleJudge
from rdpo.pool import load_pool
from rdpo.rollout import Rollout
from rdpo.rounds import RoundPipeline, score_rollouts, select_pairs

ANSWERS = ["There is a red circle.", "A blue square.", "red", "I see nothing."]


def _rollouts(records):
    # Four answers per prompt, rotated so that prompts differ in what they keep.
    return [Rollout(r, ANSWERS[i % 4:] + ANSWERS[:i % 4], [(i, j) for j in range(4)],
                    ["stop"] * 4) for i, r in enumerate(records)]


def _select(scored):
    return select_pairs(scored, min_margin=0.0, require_chosen_essential=False)


class _Recorder:
    """A reference pass that records its batches (the model's thread must run them)."""

    def __init__(self):
        self.batches, self.threads = [], set()

    def __call__(self, pairs):
        self.batches.append([(p.record.id, p.chosen, p.rejected) for p in pairs])
        self.threads.add(threading.get_ident())
        return list(pairs)


def test_pipeline_equals_the_sequential_round_and_judges_while_sampling(toy_pools):
    records = load_pool(toy_pools.train)
    rollouts = _rollouts(records)
    judge = RuleJudge()
    calls = []
    judge_many = judge.judge_many
    judge.judge_many = lambda items: (calls.append((time.monotonic(), threading.get_ident())),
                                      judge_many(items))[1]
    reference = _Recorder()
    with RoundPipeline(judge, "lexicographic", chunk=3, select=_select, reference=reference,
                       batch_size=2) as pipeline:
        added = []
        for r in rollouts:
            pipeline.add(r)
            added.append(time.monotonic())
            time.sleep(0.02)  # sampling takes time: the judge thread gets to run meanwhile
        built = pipeline.finish()
    scored = score_rollouts(RuleJudge(), rollouts, "lexicographic")
    selection = _select(scored)
    assert built.scored == scored
    assert built.selection == selection
    assert [(p.record.id, p.chosen, p.rejected) for p in built.train_pairs] == [
        (p.prompt_id, p.chosen, p.rejected) for p in selection.pairs]
    # The sequential reference pass's batches: the kept pairs in order, 2 at a time.
    expected = [(p.prompt_id, p.chosen, p.rejected) for p in selection.pairs]
    assert reference.batches == [expected[i:i + 2] for i in range(0, len(expected), 2)]
    assert reference.threads == {threading.get_ident()}
    # One call per 3 prompts, on the judge thread, the first long before sampling ended.
    assert len(calls) == -(-len(records) // 3)
    assert {t for _, t in calls} != {threading.get_ident()}
    assert calls[0][0] < added[-4]
    assert set(built.seconds) == {"sampling", "judging", "reference"}
    assert built.seconds["judging"] > 0


def test_poll_runs_reference_batches_while_prompts_still_arrive(toy_pools):
    """The vLLM engine's way (`poll` between arriving prompts): reference batches run before
    sampling ends, in the sequential round's batches."""
    records = load_pool(toy_pools.train)
    rollouts = _rollouts(records)
    reference = _Recorder()
    with RoundPipeline(RuleJudge(), "lexicographic", chunk=2, select=_select,
                       reference=reference, batch_size=2) as pipeline:
        for r in rollouts:
            pipeline.add(r)
            time.sleep(0.02)
            pipeline.poll()
        before_finish = len(reference.batches)
        built = pipeline.finish()
    expected = [(p.prompt_id, p.chosen, p.rejected)
                for p in _select(score_rollouts(RuleJudge(), rollouts, "lexicographic")).pairs]
    assert reference.batches == [expected[i:i + 2] for i in range(0, len(expected), 2)]
    assert before_finish >= len(reference.batches) - 2  # all but the last chunk's, at most
    assert len(built.train_pairs) == len(expected)


def test_judge_error_mid_pipeline_fails_fast_and_stops_the_judge_thread(toy_pools):
    records = load_pool(toy_pools.train)
    judge = RuleJudge()
    seen = []

    def failing(items):
        seen.append(len(items))
        if len(seen) == 2:
            raise RuntimeError("judge http://judge.invalid/v1 answered HTTP 500")
        time.sleep(0.05)
        return [judge.judge(r, rs) for r, rs in items]

    judge.judge_many = failing
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="http://judge.invalid/v1"):
        with RoundPipeline(judge, "lexicographic", chunk=2, select=_select,
                           reference=_Recorder(), batch_size=2) as pipeline:
            for r in _rollouts(records):
                pipeline.add(r)
                time.sleep(0.03)
            pipeline.finish()
    assert time.monotonic() - start < 10
    assert len(seen) == 2  # nothing judged after the failure
    assert not [t for t in threading.enumerate() if t.name.startswith("rdpo-judge")]


# -- end to end: fit() with pipelining on and off --------------------------------------------

def _fit(small_toy, run_dir, *extra):
    cfg = load_config("configs/quickstart.yaml", [
        *small_toy.overrides, f"run.dir={run_dir}", "dpo.max_steps=4", "rollout.every_n_steps=2",
        "rollout.batch_size=4", "data.heldout_pool=null", *extra])
    result = fit(cfg)
    rows = list(csv.DictReader((result.run_dir / "logs/metrics.csv").open()))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    return result, losses


def _same_rounds(a, b, rounds=2):
    for i in range(rounds):
        for name in ("rollouts.jsonl", "pairs.jsonl"):
            left = (a.run_dir / f"rounds/{i:04d}" / name).read_bytes()
            assert left == (b.run_dir / f"rounds/{i:04d}" / name).read_bytes(), (i, name)


@pytest.mark.slow
@pytest.mark.parametrize("judge", ["rule", "openai"])
def test_pipelined_fit_equals_sequential(small_toy, tmp_path, judge):
    """Same seed: the same rollouts, pairs (reference log-probs included) and losses, with the
    rule judge and with an OpenAI-compatible server judging (1 prompt = 4 requests per call)."""
    server = FakeOpenAIServer(judging="rule", pools=[str(small_toy.paths.train_pool)],
                              latency=0.01) if judge == "openai" else None
    extra = [] if server is None else [*server.start().judge_overrides(), "judge.cache=null"]
    try:
        on, losses_on = _fit(small_toy, tmp_path / "on", *extra)
        off, losses_off = _fit(small_toy, tmp_path / "off", *extra, "rollout.pipeline=false")
    finally:
        if server is not None:
            server.stop()
    _same_rounds(on, off)
    assert len(losses_on) == 4 and losses_on == losses_off
    # A synchronous round is sampled by the policy as it starts (rollout.async_rounds: the
    # previous round's), and its files say so.
    summary = json.loads((on.run_dir / "rounds/0001/pairs.jsonl").read_text().splitlines()[-1])
    assert summary["summary"]["policy"] == {"round": 1, "step": 2}
    assert [r["policy_step"] for r in on.rounds] == [0, 2]
    assert on.rounds[0]["pairs"] > 0
    for row in on.rounds:
        assert row["judging_seconds"] > 0 and row["sampling_seconds"] > 0


@pytest.mark.slow
def test_judge_server_error_fails_the_pipelined_round(small_toy, tmp_path):
    """HTTP 500 for the 9th request on (after max_retries=1): fit stops with the server's URL
    in the error, well before its timeouts, and leaves no judge thread behind."""
    with FakeOpenAIServer(judging="hash", faults=[None] * 8 + ["500"] * 40) as server:
        done = {}

        def run():
            try:
                _fit(small_toy, tmp_path / "run", *server.judge_overrides(), "judge.cache=null")
            except BaseException as err:  # noqa: BLE001
                done["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(240)
        assert not thread.is_alive(), "the round hung after the judge failed"
    assert server.url in str(done.get("error")), done
    assert not [t for t in threading.enumerate() if t.name.startswith("rdpo-judge")]
