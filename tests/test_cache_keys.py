"""Caches are keyed by a prompt's content, never by its id alone: a training pool and a
held-out pool both numbered from 0 must not share encodings (issue 23, item 1)."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rdpo.config import load_config
from rdpo.engine.encode import PromptCache
from rdpo.pool import load_pool

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


def test_prompt_cache_keys_by_content_not_id(processor, toy_pools):
    train, heldout = load_pool(toy_pools.train), load_pool(toy_pools.heldout)
    a = train[0]
    b = replace(heldout[0], id=a.id)  # another pool's prompt under the same id
    assert a.content_key != b.content_key
    cache = PromptCache(processor)
    ea, eb = cache.get(a), cache.get(b)
    assert cache.misses == 2 and cache.hits == 0 and len(cache) == 2
    assert not torch.equal(ea["pixel_values"], eb["pixel_values"])  # each its own image
    assert cache.get(a) is ea and cache.hits == 1
    # the same content under another id (or from another pool) is the same prompt
    assert replace(a, id="elsewhere", source="x.jsonl:9").content_key == a.content_key
    assert cache.get(replace(a, id="elsewhere")) is ea


def test_content_key_covers_instruction_and_image_bytes(toy_pools, tmp_path):
    rec = load_pool(toy_pools.train)[0]
    assert replace(rec, instruction=rec.instruction + "?").content_key != rec.content_key
    copy = tmp_path / "copy.png"
    shutil.copy(rec.images[0], copy)
    assert replace(rec, images=(copy,)).content_key == rec.content_key  # bytes, not path
    other = load_pool(toy_pools.train)[1].images[0]
    assert replace(rec, images=(other,)).content_key != rec.content_key
    # images then video frames: the same files in another role are another prompt
    assert replace(rec, images=(), video=rec.images).content_key != rec.content_key


def _renumbered(src: Path, dst_dir: Path, name: str, prefix: str) -> Path:
    """`src` pool copied into `dst_dir` (its images too) with ids prefix0, prefix1, ..."""
    lines = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    for i, rec in enumerate(lines):
        rec["id"] = f"{prefix}{i}"
        for path in rec["images"]:
            (dst_dir / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src.parent / path, dst_dir / path)
    out = dst_dir / name
    out.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return out


def _round_tokens(run_dir: Path) -> list[list]:
    rounds = sorted((run_dir / "rounds").iterdir())
    return [[(r["prompt_id"], r["sample"], r["token_ids"])
             for r in map(json.loads, (d / "rollouts.jsonl").open())] for d in rounds]


@slow
def test_colliding_ids_sample_what_distinct_ids_sample(small_toy, tmp_path):
    """Held-out ids 0..7 collide with training ids 0..15: every round samples exactly the
    tokens of the same run whose held-out ids are h0..h7 (the "before" evaluation used to
    fill the prompt cache with held-out prompts that round 0 then answered)."""
    from rdpo.fit import fit

    paths = small_toy.paths
    data = tmp_path / "data"
    train = _renumbered(Path(paths.train_pool), data, "train.jsonl", "")
    runs = {}
    for label, prefix in (("colliding", ""), ("distinct", "h")):
        heldout = _renumbered(Path(paths.heldout_pool), data, f"heldout_{label}.jsonl", prefix)
        cfg = load_config("configs/quickstart.yaml", [
            *small_toy.overrides, f"run.dir={tmp_path / label}", "dpo.max_steps=2",
            "rollout.every_n_steps=1", "run.report=false", "run.checkpoint=false",
            f"data.train_pool={train}", f"data.heldout_pool={heldout}"])
        fit(cfg)
        runs[label] = _round_tokens(tmp_path / label)
    assert len(runs["distinct"]) == 2
    for i, (got, want) in enumerate(zip(runs["colliding"], runs["distinct"], strict=True)):
        differ = sum(a != b for a, b in zip(got, want, strict=True))
        assert differ == 0, f"round {i}: {differ} of {len(want)} sampled answers differ"
