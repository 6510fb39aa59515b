"""OnPolicyDataModule: fixed steps per round whatever the filters kept, sharding, collation."""


import pytest
import torch

from rdpo.config import DataConfig
from rdpo.data import OnPolicyDataModule
from rdpo.pairs import TrainPair
from rdpo.pool import load_pool
from rdpo.tools.rubrics import main as rubrics_main


@pytest.fixture()
def dm(toy_pools, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    dm = OnPolicyDataModule(DataConfig(str(toy_pools.train), str(toy_pools.heldout),
                                       prompts_per_round=6, batch_size=4),
                            steps_per_round=3, seed=7)
    dm.connect(processor)
    dm.setup("fit")
    return dm


def test_toy_pools_validate(toy_pools, capsys):
    assert rubrics_main(["validate", str(toy_pools.train)]) == 0
    assert "16 records" in capsys.readouterr().out
    assert len(load_pool(toy_pools.heldout)) == 8


def test_round_prompts_are_seeded_samples(dm):
    a, b = dm.round_prompts(0), dm.round_prompts(0)
    assert [r.id for r in a] == [r.id for r in b] and len(a) == 6 and len({r.id for r in a}) == 6
    assert [r.id for r in dm.round_prompts(1)] != [r.id for r in a]


@pytest.mark.parametrize("n_pairs", [0, 1, 5, 30])
def test_batches_per_round_do_not_depend_on_pairs_kept(dm, n_pairs):
    records = dm.records
    pairs = [TrainPair(records[i % len(records)], f"The circle is red {i}.", "blue", -1.0 - i, -2.0)
             for i in range(n_pairs)]
    dm.set_pairs(pairs, round_index=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # steps_per_round, whatever the filters kept
    if n_pairs == 0:
        assert all(b == {"empty": True} for b in batches)
        return
    seen = []
    for b in batches:
        n = len(b["ref_chosen_logps"])
        assert b["packed"]["input_ids"].shape[0] == n  # one packed row per pair
        seen += [round(-x - 1) for x in b["ref_chosen_logps"]]
    # shuffled passes: every pair is used before any is repeated
    assert len(seen) == 12
    first = seen[:min(12, n_pairs)]
    assert len(set(first)) == len(first)
    assert len(set(seen)) == min(n_pairs, 12)


def test_shards_are_disjoint(toy_pools, tiny_model_and_processor):
    class FakeTrainer:
        def __init__(self, rank):
            self.global_rank, self.world_size = rank, 2

    shards = []
    for rank in (0, 1):
        dm = OnPolicyDataModule(DataConfig(str(toy_pools.train), batch_size=2))
        dm.connect(tiny_model_and_processor[1])
        dm.trainer = FakeTrainer(rank)
        dm.setup("fit")
        shards.append({r.id for r in dm.shard})
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 16


def test_empty_round_step_touches_every_trainable_parameter(tiny_dir):
    """A rank without pairs returns a zero loss whose backward reaches every LoRA weight (DDP)."""
    from rdpo.config import ModelConfig
    from rdpo.model import load_policy
    from rdpo.module import RubricDPOModule

    model, processor = load_policy(ModelConfig(path=str(tiny_dir)))
    module = RubricDPOModule(model, processor)
    loss = module.training_step({"empty": True}, 0)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
