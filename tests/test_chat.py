"""Chat backends: TransformersChat / TransformersJudge on the tiny VLM (plumbing: batching,
parsing, nulls; its verdicts are noise), and the image encoding shared with OpenAIChat."""

import base64
import io

import pytest
from PIL import Image

from rdpo.config import JudgeConfig
from rdpo.judging.chat import ChatRequest, TransformersChat, data_url
from rdpo.judging.judges import TransformersJudge
from rdpo.pool import load_pool


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)


@pytest.fixture(scope="module")
def chat(tiny_model_and_processor):
    return TransformersChat(tiny_model_and_processor, batch_size=2, max_new_tokens=8)


def tiny_judge(model_and_processor, **kw) -> TransformersJudge:
    cfg = JudgeConfig(kind="transformers", model="tiny", batch_size=4, max_tokens=8, cache=None,
                      **kw)
    return TransformersJudge(cfg, model=model_and_processor)


def test_batched_equals_one_by_one(chat, records):
    requests = [ChatRequest(r.images, r.instruction) for r in records[:3]]
    batched = chat.complete(requests)  # batches of 2 and 1, left-padded
    single = [chat.complete([q])[0] for q in requests]
    assert len(batched) == 3 and all(isinstance(a, str) for a in batched)
    assert batched == single
    # greedy: the same question gets the same answer
    assert chat.complete(requests[:1]) == batched[:1]


def test_two_images_in_one_prompt(chat, records):
    [answer] = chat.complete([ChatRequest(records[0].images + records[1].images, "Compare.")])
    assert isinstance(answer, str)


def test_transformers_judge_plumbing(tiny_model_and_processor, records):
    judge = tiny_judge(tiny_model_and_processor, parse_retries=1)
    items = [(r, ["The circle is red.", "Two."]) for r in records[:3]]
    verdicts = judge.judge_many(items)
    # the random tiny model never writes the JSON: every verdict is unknown, never a pass/fail
    for (record, responses), rows in zip(items, verdicts, strict=True):
        assert len(rows) == len(responses)
        for row in rows:
            assert row == {c.id: None for c in record.rubric.criteria()}
    assert judge.stats == {"requests": 12, "cache_hits": 0, "unparseable": 6}
    assert judge.outcome(records[0], ["a"]) == [None]


def test_parsing_of_model_output(tiny_model_and_processor, records, monkeypatch):
    judge = tiny_judge(tiny_model_and_processor)
    record = records[0]
    ids = [c.id for c in record.rubric.criteria()]
    answer = 'ok ```json\n{"verdicts": [' + ", ".join(
        f'{{"id": "{i}", "met": {"true" if n % 2 else "false"}}}' for n, i in enumerate(ids[:-1])
    ) + "]}\n```"
    monkeypatch.setattr(judge.chat, "complete", lambda requests, **kw: [answer] * len(requests))
    [row] = judge.judge(record, ["x"])
    assert row == {**{i: bool(n % 2) for n, i in enumerate(ids[:-1])}, ids[-1]: None}


def test_data_url_roundtrip(tmp_path, records):
    url = data_url(records[0].images[0])
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im, \
            Image.open(records[0].images[0]) as src:  # re-encoded: the pixels, nothing else
        assert im.tobytes() == src.convert("RGB").tobytes() and not im.info
    bmp = tmp_path / "x.bmp"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(bmp)
    url = data_url(bmp)  # other formats are sent as PNG
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (4, 4) and im.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
