"""OpenAIJudge against a real HTTP server on loopback that injects faults and checks requests."""

import socket
import time

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.chat import ChatError, make_chat
from rdpo.config import ConfigError, JudgeConfig
from rdpo.judges import OpenAIJudge, make_judge
from rdpo.pool import load_pool


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


@pytest.fixture
def server():
    with FakeOpenAIServer(api_key="sk-test-123") as srv:
        yield srv


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test-123")
    return "FAKE_JUDGE_KEY"


def openai_cfg(url, model, **kw) -> JudgeConfig:
    """An openai judge section (no cache file unless given)."""
    return JudgeConfig(**{"kind": "openai", "model": model, "base_url": url, "cache": None, **kw})


def judge_for(srv, key_env, **kw):
    kw = {"concurrency": 4, "timeout": 0.5, "max_retries": 3, **kw}
    return OpenAIJudge(openai_cfg(srv.url, srv.model, api_key_env=key_env, **kw))


def test_verdicts_and_requests_checked(server, key_env, records):
    record = records[0]
    ids = [c.id for c in record.rubric.criteria()]
    server.unmet = {ids[0], ids[-1]}
    judge = judge_for(server, key_env)
    verdicts = judge.judge(record, ["The answer.", "Another answer."])
    expect = {i: i not in server.unmet for i in ids}
    assert verdicts == [expect, expect]
    assert server.problems == []
    assert len(server.requests) == 2
    for seen in server.requests:
        assert seen.ids == ids and seen.images == len(record.images) == 1
        assert record.instruction in seen.text
    # the response is in the prompt verbatim
    assert any("Another answer." in s.text for s in server.requests)
    assert judge.stats == {"requests": 2, "cache_hits": 0, "unparseable": 0}


def test_http_faults_are_retried(server, key_env, records):
    server.faults = ["500", "429", "drop", "slow"]
    server.slow_seconds = 1.0
    judge = judge_for(server, key_env, concurrency=1, max_retries=4)
    start = time.perf_counter()
    [verdicts] = judge.judge(records[1], ["x"])
    assert all(v is True for v in verdicts.values())
    # 4 failed attempts, then the good one; all on the one judgment
    assert [s.fault for s in server.requests] == ["500", "429", "drop", "slow", None]
    assert judge.stats["requests"] == 1 and server.problems == []
    assert time.perf_counter() - start < 8


def test_malformed_and_missing_answers(server, key_env, records):
    record = records[2]
    ids = [c.id for c in record.rubric.criteria()]
    # answer 1: malformed then fine on the re-ask; answer 2: one criterion left out
    server.faults = ["malformed", "missing"]
    judge = judge_for(server, key_env, concurrency=1)
    first, second = judge.judge(record, ["a", "b"])
    assert first == dict.fromkeys(ids, True)
    assert second == {**dict.fromkeys(ids[:-1], True), ids[-1]: None}
    assert judge.stats["requests"] == 3 and judge.stats["unparseable"] == 0


def test_unparseable_after_retries_is_null_and_counted(server, key_env, records):
    record = records[3]
    server.faults = ["malformed"] * 3
    judge = judge_for(server, key_env, parse_retries=2)
    [verdicts] = judge.judge(record, ["a"])
    assert verdicts == {c.id: None for c in record.rubric.criteria()}
    assert judge.stats == {"requests": 3, "cache_hits": 0, "unparseable": 1}


def test_concurrency_limit(key_env, records, monkeypatch):
    with FakeOpenAIServer(api_key="sk-test-123", latency=0.2) as srv:
        judge = judge_for(srv, key_env, concurrency=3)
        start = time.perf_counter()
        out = judge.judge_many([(r, [f"answer {i}"]) for i, r in enumerate(records[:9])])
        elapsed = time.perf_counter() - start
    assert len(out) == 9 and srv.max_inflight == 3
    assert elapsed < 9 * 0.2 / 3 * 1.5 + 0.5  # ~0.6 s; serial would be 1.8 s


def test_outcome_mode(server, key_env, records):
    server.score = 9
    judge = judge_for(server, key_env)
    assert judge.outcome(records[0], ["a", "b"]) == [9, 9]
    assert server.problems == [] and all(s.ids == [] for s in server.requests)
    # the reference answer guides the holistic verdict; the rubric is not shown
    assert records[0].reference in server.requests[0].text
    assert records[0].rubric.essential[0].text not in server.requests[0].text


def test_unreachable_endpoint_names_url(key_env, records):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(openai_cfg(url, "m", api_key_env=key_env, timeout=0.5, max_retries=1))
    with pytest.raises(ChatError, match=rf"cannot reach {url}.*after 1 retries"):
        judge.judge(records[0], ["a"])


def test_persistent_server_error_names_url(server, key_env, records):
    server.faults = ["500"] * 3
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
