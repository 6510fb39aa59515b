"""The sqlite judge cache: a repeated judgment is never requested twice; any change re-asks."""

import dataclasses
import json
import shutil

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.config import JudgeConfig
from rdpo.judging.cache import JudgeCache, judgment_key
from rdpo.judging.chat import ChatRequest
from rdpo.judging.judges import PARSER_VERSION, TEMPLATE_VERSION, OpenAIJudge
from rdpo.pool import Criterion, load_pool


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


def cached_judge(srv, path, **kw) -> OpenAIJudge:
    return OpenAIJudge(JudgeConfig(kind="openai", model=srv.model, base_url=srv.url,
                                   cache=str(path), **kw))


def test_second_pass_makes_no_request(tmp_path, records):
    items = [(r, ["The circle is red.", "Two shapes.", "The circle is red."]) for r in records[:6]]
    with FakeOpenAIServer(unmet={"E1"}) as srv:
        first = cached_judge(srv, tmp_path / "c.sqlite")
        v1 = first.judge_many(items)
        o1 = first.outcome_many(items)
        # a duplicated response inside one prompt is asked once
        assert srv.request_count == 6 * 2 * 2 == first.stats["requests"]
        # a fresh process: a new judge and a new connection to the same file
        second = cached_judge(srv, tmp_path / "c.sqlite")
        assert second.judge_many(items) == v1 and second.outcome_many(items) == o1
        assert srv.request_count == 24
        assert second.stats == {"requests": 0, "cache_hits": 36, "unparseable": 0}
    assert len(JudgeCache(tmp_path / "c.sqlite")) == 24


def test_key_covers_judge_template_parser_text_images(tmp_path, records):
    r = records[0]
    image = r.images[0]
    ident = {"chat": {"model": "m"}, "template": TEMPLATE_VERSION, "parser": PARSER_VERSION}
    req = ChatRequest((image,), "prompt", "system")
    base = judgment_key(ident, req)
    assert base == judgment_key(dict(reversed(ident.items())), req)  # canonical: order is moot
    assert base != judgment_key({**ident, "chat": {"model": "m2"}}, req)
    assert base != judgment_key({**ident, "template": TEMPLATE_VERSION + 1}, req)
    assert base != judgment_key({**ident, "parser": PARSER_VERSION + 1}, req)
    assert base != judgment_key(ident, ChatRequest((image,), "prompt!", "system"))
    assert base != judgment_key(ident, ChatRequest((image,), "prompt", "system!"))
    assert base != judgment_key(ident, ChatRequest((image,), "prompt"))
    # the image's content counts, not its path
    copy = tmp_path / "moved.png"
    shutil.copy(image, copy)
    assert base == judgment_key(ident, ChatRequest((copy,), "prompt", "system"))
    copy.write_bytes(records[1].images[0].read_bytes())
    assert base != judgment_key(ident, ChatRequest((copy,), "prompt", "system"))


def test_another_judge_under_the_same_name_is_asked_again(tmp_path, records):
    """A new judge served under the same model name elsewhere, or asked with other sampling
    settings, does not get the old judge's verdicts."""
    items = [(records[0], ["The circle is red."])]
    path = tmp_path / "c.sqlite"
    with FakeOpenAIServer(unmet={"E1"}) as old, FakeOpenAIServer() as new:
        assert cached_judge(old, path).judge_many(items)[0][0]["E1"] is False
        again = cached_judge(old, path)
        again.judge_many(items)
        assert again.stats["cache_hits"] == 1  # the same judge: from the cache
        moved = cached_judge(new, path)  # same name, another server
        assert moved.judge_many(items)[0][0]["E1"] is True and new.request_count == 1
        longer = cached_judge(new, path, max_tokens=2048)
        longer.judge_many(items)
        assert longer.stats["cache_hits"] == 0 and new.request_count == 2
    ids = {json.dumps(cached_judge(s, path).identity, sort_keys=True) for s in (old, new)}
    assert len(ids) == 2


def test_one_file_per_rank(tmp_path, records, monkeypatch):
    """Several ranks never share one sqlite file (over a network filesystem its locks do not
    hold across hosts): each rank opens its own, and finds its verdicts there on resume."""
    items = [(records[0], ["The circle is red."])]
    path = tmp_path / "judge_cache.sqlite"
    with FakeOpenAIServer() as srv:
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            judge = cached_judge(srv, path)
            judge.judge_many(items)
            assert judge.cache.path == tmp_path / f"judge_cache.rank{rank}.sqlite"
        assert srv.request_count == 2  # rank 1 did not read rank 0's file
        monkeypatch.setenv("RANK", "1")
        judge = cached_judge(srv, path)
        judge.judge_many(items)
        assert judge.stats["cache_hits"] == 1 and srv.request_count == 2
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        single = cached_judge(srv, path)
        single.judge_many(items)
        assert single.cache.path == path
    assert sorted(p.name for p in tmp_path.glob("*.sqlite")) == [
        "judge_cache.rank0.sqlite", "judge_cache.rank1.sqlite", "judge_cache.sqlite"]


def test_changed_criterion_or_response_is_asked_again(tmp_path, records):
    r = records[0]
    with FakeOpenAIServer() as srv:
        judge = cached_judge(srv, tmp_path / "c.sqlite")
        judge.judge(r, ["a"])
        judge.judge(r, ["a"])
        assert srv.request_count == 1
        judge.judge(r, ["a "])  # the response verbatim: a trailing space is another response
        assert srv.request_count == 2
        c = r.rubric.essential[0]
        edited = dataclasses.replace(r, rubric=dataclasses.replace(
            r.rubric, essential=(Criterion(c.id, c.text + " Exactly.", c.weight, c.check),
                                 *r.rubric.essential[1:])))
        judge.judge(edited, ["a"])
        assert srv.request_count == 3


def test_unparseable_is_not_cached(tmp_path, records):
    with FakeOpenAIServer(faults=["malformed"] * 2) as srv:
        judge = cached_judge(srv, tmp_path / "c.sqlite", parse_retries=1)
        [v] = judge.judge(records[0], ["a"])
        assert set(v.values()) == {None} and judge.stats["unparseable"] == 1
        [v] = judge.judge(records[0], ["a"])  # asked again, now answered
        assert set(v.values()) == {True} and srv.request_count == 3


def test_bad_cache_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "c.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="c.sqlite: not a usable sqlite file"):
        JudgeCache(bad)
