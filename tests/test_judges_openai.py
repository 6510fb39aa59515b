"""OpenAIJudge against a real HTTP server on loopback (its own process) that injects faults
and checks requests."""

import logging
import socket
import time

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.config import ConfigError, JudgeConfig
from rdpo.judging.chat import ChatError, ChatTimeout, make_chat
from rdpo.judging.judges import OpenAIJudge, judge_round, make_judge
from rdpo.pool import load_pool


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


@pytest.fixture(scope="module")
def server_process():
    with FakeOpenAIServer(api_key="sk-test-123") as srv:
        yield srv


@pytest.fixture
def server(server_process):
    """The module's server, back to its start settings with nothing seen."""
    server_process.reset()
    return server_process


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test-123")
    return "FAKE_JUDGE_KEY"


def openai_cfg(url, model, **kw) -> JudgeConfig:
    """An openai judge section (no cache file unless given)."""
    return JudgeConfig(**{"kind": "openai", "model": model, "base_url": url, "cache": None, **kw})


def judge_for(srv, key_env, **kw):
    kw = {"concurrency": 4, "timeout": 20, "max_retries": 3, **kw}
    return OpenAIJudge(openai_cfg(srv.url, srv.model, api_key_env=key_env, **kw))


def test_verdicts_and_requests_checked(server, key_env, records):
    record = records[0]
    ids = [c.id for c in record.rubric.criteria()]
    unmet = {ids[0], ids[-1]}
    server.configure(unmet=unmet)
    judge = judge_for(server, key_env)
    verdicts = judge.judge(record, ["The answer.", "Another answer."])
    expect = {i: i not in unmet for i in ids}
    assert verdicts == [expect, expect]
    assert server.problems == []
    requests = server.requests
    assert len(requests) == 2
    for seen in requests:
        assert seen.ids == ids and seen.images == len(record.images) == 1
        assert record.instruction in seen.text
    # the response is in the prompt verbatim
    assert any("Another answer." in s.text for s in requests)
    assert judge.stats == {"requests": 2, "cache_hits": 0, "unparseable": 0}


def test_http_faults_are_retried(server, key_env, records):
    """A dropped connection, a request that outlasts the client's timeout (the server answers
    nothing until the client hangs up), 500 and 429 are each retried on the one judgment (the
    two without retry-after first: the client's own backoff doubles with each retry)."""
    server.queue("drop", "slow", "500", "429")
    judge = judge_for(server, key_env, concurrency=1, max_retries=4, timeout=2)
    [verdicts] = judge.judge(records[1], ["x"])
    assert all(v is True for v in verdicts.values())
    requests = server.requests
    assert [s.fault for s in requests] == ["drop", "slow", "500", "429", None]
    # the slow attempt ended by the client's timeout, not by the server giving in
    assert [s.outcome for s in requests] == ["drop", "hangup", 500, 429, 200]
    assert len({s.text for s in requests}) == 1
    assert judge.stats["requests"] == 1 and server.problems == []


def test_malformed_and_missing_answers(server, key_env, records):
    record = records[2]
    ids = [c.id for c in record.rubric.criteria()]
    # answer 1: malformed then fine on the re-ask; answer 2: one criterion left out
    server.queue("malformed", "missing")
    judge = judge_for(server, key_env, concurrency=1)
    first, second = judge.judge(record, ["a", "b"])
    assert first == dict.fromkeys(ids, True)
    assert second == {**dict.fromkeys(ids[:-1], True), ids[-1]: None}
    assert judge.stats["requests"] == 3 and judge.stats["unparseable"] == 0


def test_unparseable_after_retries_is_null_and_counted(server, key_env, records):
    record = records[3]
    server.queue(*["malformed"] * 3)
    judge = judge_for(server, key_env, parse_retries=2)
    [verdicts] = judge.judge(record, ["a"])
    assert verdicts == {c.id: None for c in record.rubric.criteria()}
    assert judge.stats == {"requests": 3, "cache_hits": 0, "unparseable": 1}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit(server, key_env, records, concurrency):
    """judge.concurrency requests in flight at once, never more: the server holds requests
    until `concurrency` are in progress together (its gate; a client that sent fewer would
    wait out the gate's timeout and show a smaller peak), then answers each after a short
    delay, so a client exceeding the limit would show a larger peak."""
    server.configure(gate=concurrency, latency=0.05)
    judge = judge_for(server, key_env, concurrency=concurrency)
    out = judge.judge_many([(r, [f"answer {i}"]) for i, r in enumerate(records[:9])])
    assert len(out) == 9 and server.request_count == 9
    assert server.max_inflight == concurrency


def test_outcome_mode(server, key_env, records):
    server.configure(score=9)
    judge = judge_for(server, key_env)
    assert judge.outcome(records[0], ["a", "b"]) == [9, 9]
    requests = server.requests
    assert server.problems == [] and all(s.ids == [] for s in requests)
    # the reference answer guides the holistic verdict; the rubric is not shown
    assert records[0].reference in requests[0].text
    assert records[0].rubric.essential[0].text not in requests[0].text


def test_unreachable_endpoint_names_url(key_env, records):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(openai_cfg(url, "m", api_key_env=key_env, timeout=5, max_retries=1))
    with pytest.raises(ChatError, match=rf"cannot reach {url}.*after 1 retries"):
        judge.judge(records[0], ["a"])


def test_persistent_server_error_names_url(server, key_env, records):
    server.queue(*["500"] * 3)
    judge = judge_for(server, key_env, max_retries=2)
    with pytest.raises(ChatError, match=rf"{server.url} answered HTTP 500 after 2 retries"):
        judge.judge(records[0], ["a"])
    assert len(server.requests) == 3


def test_api_key_from_env_never_shown(server, monkeypatch, records):
    monkeypatch.delenv("MISSING_JUDGE_KEY", raising=False)
    with pytest.raises(ChatError, match="MISSING_JUDGE_KEY"):
        make_chat(openai_cfg(server.url, server.model, api_key_env="MISSING_JUDGE_KEY"))
    monkeypatch.setenv("GOOD_KEY", "sk-test-123")
    chat = make_chat(openai_cfg(server.url, server.model, api_key_env="GOOD_KEY"))
    assert "sk-test-123" not in repr(chat) and "sk-test-123" not in str(vars(chat).get("name"))
    # a wrong key reaches the server as a wrong bearer token: the server refuses it
    monkeypatch.setenv("BAD_KEY", "sk-wrong")
    judge = OpenAIJudge(openai_cfg(server.url, server.model, api_key_env="BAD_KEY",
                                   max_retries=0))
    with pytest.raises(ChatError, match="HTTP 400"):
        judge.judge(records[0], ["a"])
    assert server.problems == ["missing or wrong bearer key"]


def test_make_judge_errors():
    """make_judge checks its section with the config's own rules: every problem, by key."""
    with pytest.raises(ConfigError, match="judge.model") as err:
        make_judge(JudgeConfig(kind="openai", base_url="http://127.0.0.1:1/v1", cache=None))
    assert err.value.problems == ["judge.model: an openai judge needs a model (the served "
                                  "model name)"]
    with pytest.raises(ConfigError, match="judge.base_url"):
        make_judge(JudgeConfig(kind="openai", model="m", cache=None))
    with pytest.raises(ConfigError) as err:
        make_judge(JudgeConfig(kind="nope", model="m", concurrency=0, cache=None))
    assert [p.split(":")[0] for p in err.value.problems] == ["judge.kind", "judge.concurrency"]
    # the run.dir placeholder of the default cache path is filled only by load_config
    with pytest.raises(ConfigError, match="judge.cache"):
        make_judge(JudgeConfig(kind="openai", model="m", base_url="http://127.0.0.1:1/v1"))


def test_settings_come_from_the_section(server, key_env):
    cfg = openai_cfg(server.url, server.model, api_key_env=key_env, concurrency=3, timeout=7.5,
                     max_retries=2, max_tokens=77, parse_retries=5)
    judge = make_judge(cfg, strategy="outcome")
    chat = judge.chat
    assert (chat.concurrency, chat.max_retries, chat.max_tokens) == (3, 2, 77)
    assert chat._client.timeout == 7.5 and chat._client.max_retries == 2
    assert (judge.parse_retries, judge.strategy, judge.cache) == (5, "outcome", None)
    assert make_judge(JudgeConfig(kind="rule")).strategy == "rubric"


# -- failures mid-round, deadlines, rate limits -------------------------------------------------


def test_fatal_error_keeps_received_verdicts_and_does_not_wait(server, key_env, records,
                                                                 tmp_path):
    """A request that fails for good ends the call at once: the verdicts already received are
    in the cache, the queued requests are never sent and the one still in flight (here it
    hangs until its 20 s timeout) is not waited for."""
    items = [(r, ["The circle is red."]) for r in records[:12]]
    server.queue(None, None, "slow", "500")
    cache = tmp_path / "c.sqlite"
    judge = judge_for(server, key_env, concurrency=2, max_retries=0, timeout=20,
                      cache=str(cache))
    start = time.monotonic()
    with pytest.raises(ChatError, match=rf"{server.url} answered HTTP 500"):
        judge.judge_many(items)
    assert time.monotonic() - start < 10  # the hanging request would hold it 20 s
    assert server.request_count == 4  # of 12: nothing was sent after the failure
    server.reset()
    again = judge_for(server, key_env, cache=str(cache))
    verdicts = again.judge_many(items)
    assert again.stats["cache_hits"] == 2 and server.request_count == 10
    assert all(v is True for row in verdicts for vs in row for v in vs.values())


def test_round_deadline_is_an_error_naming_the_judge(server, key_env, records, tmp_path):
    server.hold_after(2)  # two answers, then the server answers nothing
    judge = judge_for(server, key_env, concurrency=2, timeout=30, round_timeout=1.5,
                      cache=str(tmp_path / "c.sqlite"))
    start = time.monotonic()
    try:
        with pytest.raises(ChatTimeout) as err:
            judge.judge_many([(r, ["a"]) for r in records[:6]])
    finally:
        server.release()
    assert 1.4 < time.monotonic() - start < 8
    message = str(err.value)
    assert server.url in message and "judge.round_timeout=1.5 s" in message
    assert "4 of 6 requests unanswered" in message and "2 answers received" in message
    assert len(judge.cache) == 2


def test_one_deadline_over_a_rounds_calls(server, key_env, records):
    """A training round judges its prompts chunk by chunk (`judge_round` around the calls):
    the deadline is the round's, not each call's."""
    server.configure(latency=0.4)
    judge = judge_for(server, key_env, concurrency=1, round_timeout=2.0)
    calls = [[(r, ["a"]) for r in records[i:i + 2]] for i in (0, 2, 4)]  # 0.8 s each
    for items in calls:  # alone, each call is a round of its own
        judge.judge_many(items)
    server.reset()
    server.configure(latency=0.4)
    with judge_round(judge):
        judge.judge_many([(r, ["b"]) for r in records[:2]])
        judge.judge_many([(r, ["b"]) for r in records[2:4]])
        with pytest.raises(ChatTimeout, match=server.url):
            judge.judge_many([(r, ["b"]) for r in records[4:6]])  # 2.4 s into the round


def test_rate_limit_retry_after_is_honoured(server, key_env, records):
    server.queue("429@1")
    judge = judge_for(server, key_env, max_retries=2)
    judge.judge(records[0], ["a"])
    first, retry = server.requests
    assert first.outcome == 429 and retry.outcome == 200
    assert retry.t - first.t >= 0.95  # the server's retry-after: 1 s, not the 0.5 s backoff


def test_rate_limit_has_its_own_longer_budget(server, key_env, records):
    server.queue(*["429@0.05"] * 5)
    judge = judge_for(server, key_env, max_retries=1, rate_limit_retries=3)
    assert all(judge.judge(records[0], ["a"])[0].values())
    assert [s.outcome for s in server.requests] == [429] * 5 + [200]
    server.reset()
    server.queue(*["429@0.05"] * 5)
    judge = judge_for(server, key_env, max_retries=1, rate_limit_retries=2)
    with pytest.raises(ChatError, match=r"HTTP 429 after 4 retries \(retry-after: 0.05 s"):
        judge.judge(records[0], ["a"])


def test_non_finite_answers_are_unknown_and_logged_once_per_round(server, key_env, records,
                                                                  caplog):
    server.queue(*['answer:{"score": NaN}', 'answer:{"score": Infinity}'] * 2)
    judge = judge_for(server, key_env, concurrency=1, parse_retries=1)
    with caplog.at_level(logging.WARNING, logger="rdpo"), judge.round():
        assert judge.outcome(records[0], ["a"]) == [None]
        assert judge.outcome(records[1], ["b"]) == [None]
        assert judge.outcome(records[2], ["c"]) == [7]
    assert judge.stats == {"requests": 5, "cache_hits": 0, "unparseable": 2}
    [line] = [r.getMessage() for r in caplog.records if "no readable verdict" in r.getMessage()]
    assert "2 answer(s)" in line and "NaN" in line
