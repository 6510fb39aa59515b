"""The sqlite judge cache: a repeated judgment is never requested twice; any change re-asks."""

import dataclasses
import shutil

import pytest
from fake_openai_server import FakeOpenAIServer

from rdpo.config import JudgeConfig
from rdpo.judge_cache import JudgeCache, judgment_key
from rdpo.judges import TEMPLATE_VERSION, OpenAIJudge
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


def test_key_covers_model_template_criteria_images_response(tmp_path, records):
    r = records[0]
    image = r.images[0]
    base = judgment_key("m", TEMPLATE_VERSION, "prompt", [image])
    assert base == judgment_key("m", TEMPLATE_VERSION, "prompt", [image])
    assert base != judgment_key("m2", TEMPLATE_VERSION, "prompt", [image])
    assert base != judgment_key("m", TEMPLATE_VERSION + 1, "prompt", [image])
    assert base != judgment_key("m", TEMPLATE_VERSION, "prompt!", [image])
    # the image's content counts, not its path
    copy = tmp_path / "moved.png"
    shutil.copy(image, copy)
    assert base == judgment_key("m", TEMPLATE_VERSION, "prompt", [copy])
    copy.write_bytes(records[1].images[0].read_bytes())
    assert base != judgment_key("m", TEMPLATE_VERSION, "prompt", [copy])


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
