"""Rollouts keep what was sampled (ids, finish reason), sample with rdpo's settings only, and
the pieces around them: dropout off, one bounded prompt cache, pair usage of a round."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from rdpo.config import LoraConfig, ModelConfig, RolloutConfig
from rdpo.engine.collate import PairCollator
from rdpo.engine.encode import PromptCache, completion_ids, end_of_turn_id
from rdpo.engine.packing import CHOSEN, REJECTED
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool
from rdpo.rollout import LENGTH, STOP, generate, split_sample, stop_token_ids


@pytest.fixture(scope="module")
def records(toy_pools):
    return load_pool(toy_pools.train)[:3]


def sample(model, processor, records, seed=0, **settings):
    torch.manual_seed(seed)
    cfg = RolloutConfig(**{"samples_per_prompt": 3, "max_new_tokens": 8, **settings})
    return list(generate(model, processor, records, cfg))


def test_split_sample():
    assert split_sample([5, 6, 2, 9, 2], {2}) == ((5, 6, 2), STOP)
    assert split_sample([5, 6, 7], {2}) == ((5, 6, 7), LENGTH)
    assert split_sample([2], {2, 3}) == ((2,), STOP)


def test_rollouts_keep_ids_and_finish_reasons(tiny_model_and_processor, records):
    model, processor = tiny_model_and_processor
    eot = end_of_turn_id(processor)
    stops = set(stop_token_ids(processor, model))
    rollouts = sample(model, processor, records, max_new_tokens=6)
    assert [len(r.responses) for r in rollouts] == [3, 3, 3]
    reasons = set()
    for r in rollouts:
        for text, ids, reason in zip(r.responses, r.token_ids, r.finish_reasons, strict=True):
            reasons.add(reason)
            if reason == LENGTH:  # a random-init model rarely stops: cut at the limit
                assert len(ids) == 6 and not stops & set(ids)
            else:
                assert ids[-1] in stops and not stops & set(ids[:-1])
            body = ids[:-1] if reason == STOP else ids
            assert text == processor.tokenizer.decode(body, skip_special_tokens=True).strip()
    assert LENGTH in reasons
    assert eot in stops


def test_truncated_completion_trains_as_sampled(tiny_model_and_processor, records):
    """No end of turn is appended to a response cut at the limit, and a finished one keeps its
    own: the packed row holds exactly the sampled ids."""
    _, processor = tiny_model_and_processor
    eot = end_of_turn_id(processor)
    cut, finished = (11, 12, 13), (21, 22, eot)
    pair = TrainPair(records[0], "x", "y", 0.0, 0.0, cut, finished)
    row = PairCollator(processor)([pair])["packed"]
    ids, seg = row["input_ids"][0], row["segments"][0]
    assert tuple(ids[seg == CHOSEN].tolist()) == cut
    assert tuple(ids[seg == REJECTED].tolist()) == finished
    # text completions (warm start, benchmarks) are tokenized and given the end of turn
    assert completion_ids(processor, "red")[-1] == eot


@pytest.fixture(scope="module")
def instruct_checkpoint(tiny_dir, tiny_model_and_processor, tmp_path_factory):
    """The tiny model saved as an Instruct checkpoint would ship: a generation_config.json with a
    repetition penalty, top-k, a low temperature and the end-of-turn ids as stop ids."""
    from transformers import AutoModelForImageTextToText

    _, processor = tiny_model_and_processor
    path = tmp_path_factory.mktemp("instruct")
    shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
    eos = [end_of_turn_id(processor), processor.tokenizer.eos_token_id]
    (path / "generation_config.json").write_text(json.dumps({
        "repetition_penalty": 1.8, "top_k": 3, "temperature": 0.05, "top_p": 0.5,
        "do_sample": True, "eos_token_id": eos, "bos_token_id": eos[-1],
        "pad_token_id": eos[-1]}))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    assert model.generation_config.repetition_penalty == 1.8
    return model


def test_checkpoint_generation_config_is_not_inherited(tiny_model_and_processor, records,
                                                       instruct_checkpoint):
    model, processor = tiny_model_and_processor
    plain = sample(model, processor, records, max_new_tokens=10)
    instruct = sample(instruct_checkpoint, processor, records, max_new_tokens=10)
    assert [r.token_ids for r in instruct] == [r.token_ids for r in plain]
    # the checkpoint's own generation config is left as it was
    assert instruct_checkpoint.generation_config.repetition_penalty == 1.8
    # asked for in rdpo's config, the same knobs do change the samples
    asked = sample(instruct_checkpoint, processor, records, max_new_tokens=10,
                   repetition_penalty=1.8, top_k=3)
    assert [r.token_ids for r in asked] != [r.token_ids for r in plain]


def test_generation_config_stop_ids_end_sampling(tiny_model_and_processor, records):
    """An end-of-sequence id only the checkpoint's generation config names still ends a turn."""
    model, processor = tiny_model_and_processor
    first = sample(model, processor, records, max_new_tokens=10)
    common = first[0].token_ids[0][1]  # a token the policy samples here
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [common]
    try:
        again = sample(model, processor, records, max_new_tokens=10)
    finally:
        model.generation_config.eos_token_id = saved
    ids, reason = again[0].token_ids[0], again[0].finish_reasons[0]
    assert ids == first[0].token_ids[0][:2] and reason == STOP


def test_disable_dropout(tiny_dir, caplog):
    from rdpo.model import load_policy

    cfg = ModelConfig(path=str(tiny_dir), lora=LoraConfig(dropout=0.3))
    model, _ = load_policy(cfg)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())
    cfg.disable_dropout = False
    with caplog.at_level(logging.WARNING, logger="rdpo.model"):
        model, _ = load_policy(cfg)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())
    assert "disable_dropout=false" in caplog.text


def test_prompt_cache_is_bounded_lru(tiny_model_and_processor, records):
    _, processor = tiny_model_and_processor
    one = PromptCache(processor, max_mb=1024)
    size = one.get(records[0])
    nbytes = sum(v.numel() * v.element_size() for v in size.values())
    cache = PromptCache(processor, max_mb=2.5 * nbytes / 2**20)  # room for two prompts
    for r in (records[0], records[1], records[0], records[2]):
        cache.get(r)
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert (cache.hits, cache.misses) == (1, 3)
    cache.get(records[0])  # used most recently before records[2]: still there
    assert cache.hits == 2
    cache.get(records[1])  # dropped as least recently used: encoded again
    assert cache.misses == 4
    none = PromptCache(processor, max_mb=0)
    none.get(records[0])
    assert len(none) == 0 and none.bytes == 0


def test_pair_usage_and_unused_warning(toy_pools, caplog):
    from rdpo.config import DataConfig
    from rdpo.data import OnPolicyDataModule

    recs = load_pool(toy_pools.train)
    dm = OnPolicyDataModule(DataConfig(str(toy_pools.train), batch_size=2), steps_per_round=3)
    pairs = [TrainPair(recs[i % len(recs)], f"c{i}", "r", -1.0, -2.0) for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="rdpo"):
        dm.set_pairs(pairs, 0)
    assert dm.pair_usage() == {"pair_uses_min": 0, "pair_uses_max": 1, "pairs_unused": 4}
    assert "4 of 10 pairs will not be trained" in caplog.text
    dm.set_pairs(pairs[:4], 1)
    assert dm.pair_usage() == {"pair_uses_min": 1, "pair_uses_max": 2, "pairs_unused": 0}
