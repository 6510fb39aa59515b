"""examples/own_module.py: a user's own LightningModule trained with rdpo's data module and callback."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from rdpo.module import RubricDPOModule

pytestmark = pytest.mark.slow  # Lightning fit loops on the warm-started toy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_module.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("own_module", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(small_toy):
    return small_toy.paths


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_own_module_trains_on_rubric_rounds(example, toy, tmp_path):
    module, callback, trainer = example.train(
        str(toy.policy), str(toy.train_pool), tmp_path, max_steps=4, steps_per_round=2,
        prompts_per_round=16, samples_per_prompt=4, batch_size=4, lr=5e-3)
    assert not isinstance(module, RubricDPOModule)
    assert trainer.global_step == 4
    # a round before step 0 and one at step 2, each written by the callback
    assert [r["step"] for r in callback.history] == [0, 2]
    for index, row in enumerate(callback.history):
        lines = [json.loads(x) for x in (tmp_path / f"rounds/{index:04d}/pairs.jsonl").open()]
        assert lines[-1]["summary"]["kept"] == row["pairs"] > 0
    # the module's own loss: ln 2 at step 0 (LoRA B starts at zero, so policy == base reference)
    assert len(module.losses) == 4
    assert module.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert any(p.abs().sum() > 0 for p in _lora_b(module.model).values())


def test_round_without_pairs_still_takes_its_steps(example, toy, tmp_path):
    """min_margin above any score gap: no pair, 'empty' batches, and the steps still count."""
    module, callback, trainer = example.train(
        str(toy.policy), str(toy.train_pool), tmp_path, max_steps=2, steps_per_round=2,
        prompts_per_round=4, samples_per_prompt=2, batch_size=2, min_margin=2.0)
    assert callback.history[0]["pairs"] == 0 and trainer.global_step == 2
    assert module.losses == []  # training_step saw only empty batches
    assert all(torch.count_nonzero(p) == 0 for p in _lora_b(module.model).values())
