"""OnPolicyDataModule: the rubric pool, each round's prompts, and the round's DPO pairs."""

from __future__ import annotations

import logging
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rdpo.config import DataConfig, RolloutConfig
from rdpo.engine.collate import PairCollator
from rdpo.engine.encode import PromptCache
from rdpo.engine.vision_cache import VisionCache
from rdpo.pairs import TrainPair, pair_from_dict, pair_to_dict
from rdpo.pool import PromptRecord, load_pool

log = logging.getLogger("rdpo")

__all__ = ["OnPolicyDataModule", "PairCollator", "TrainPair", "RoundDataset"]


class RoundDataset(Dataset):
    """A fixed-length view of the current round's pairs, read when a batch is fetched.

    The length is the round's batch count × batch size whatever the filters kept, so every rank
    takes the same number of optimizer steps per round and uneven pair counts cannot hang a
    collective. Pairs are visited in shuffled passes; with no pairs every item is None.
    """

    def __init__(self, datamodule: OnPolicyDataModule, length: int):
        self.dm = datamodule
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TrainPair | None:
        order = self.dm.order
        return self.dm.pairs[order[index % len(order)]] if order else None


class RoundSampler(Sampler):
    """Item indices of the round from ``start_batch`` on, so a run resumed mid-round serves
    the batches it had not yet trained on; the length stays the whole round's."""

    def __init__(self, datamodule: OnPolicyDataModule):
        self.dm = datamodule

    def __len__(self) -> int:
        return self.dm.items_per_round

    def __iter__(self):
        return iter(range(self.dm.start_batch * self.dm.batch_size, self.dm.items_per_round))


class RoundLoader(DataLoader):
    """A DataLoader Lightning treats as resumable: its position is the data module's state
    (``batches_done`` in the checkpoint), so there is nothing of its own to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class OnPolicyDataModule(L.LightningDataModule):
    """Serves each round's pairs; the round itself is run by `RubricScoringCallback`.

    `data` is the config's data section (`rdpo.config.DataConfig`); `steps_per_round` is
    rollout.every_n_steps, `seed` run.seed, `packed` whether pairs are packed into one sequence
    (`rdpo.engine.packing.packing_support`). The processor arrives late through `connect` (or
    is taken from the LightningModule's ``processor`` attribute at setup).
    """

    def __init__(self, data: DataConfig, *, steps_per_round: int = RolloutConfig.every_n_steps,
                 seed: int = 0, packed: bool = True):
        super().__init__()
        self.data = data
        self.pool_files = {"max_pixels": data.max_image_pixels, "allow_outside": data.allow_outside_paths}
        """How the pools' image files are checked (`rdpo.pool.check_pool`)."""
        self.packed = packed
        self.train_pool = data.train_pool
        self.heldout_pool = data.heldout_pool
        self.prompts_per_round = data.prompts_per_round
        self.batch_size = data.batch_size
        self.steps_per_round = steps_per_round
        self.accumulate_grad_batches = data.accumulate_grad_batches
        self.seed = seed
        self.processor = None
        self.collator: PairCollator | None = None
        self.prompts: PromptCache | None = None
        """Encoded prompts, shared by the round's rollout and the pair collation."""
        self.vision: VisionCache | None = None
        """Image features of the prompts, encoded by the reference pass, reused by the steps."""
        self.records: list[PromptRecord] = []
        self.shard: list[PromptRecord] = []
        self.heldout: list[PromptRecord] = []
        self.pairs: list[TrainPair] = []
        self.order: list[int] = []
        self.round = -1
        self.batches_done = 0
        """Batches of this round trained so far (advanced by `RubricScoringCallback`)."""
        self.start_batch = 0

    def connect(self, processor) -> None:
        self.processor = processor
        self.prompts = PromptCache(processor, max_mb=self.data.prompt_cache_mb)
        self.vision = VisionCache(self.data.vision_cache_mb) if self.data.vision_cache_mb else None
        self.collator = PairCollator(processor, packed=self.packed, prompts=self.prompts,
                                     vision=self.vision)

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None and self.trainer is not None:
            self.connect(self.trainer.lightning_module.processor)
        self._load_pools()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # Each rank rolls out its own, disjoint shard of the pool.
        self.shard = self.records[rank::world]
        if not self.shard:
            raise ValueError(f"{self.train_pool}: {len(self.records)} prompts cannot be "
                             f"sharded over {world} ranks")

    def _load_pools(self) -> None:
        if not self.records:
            self.records = load_pool(self.train_pool, **self.pool_files)
            if self.heldout_pool:
                self.heldout = load_pool(self.heldout_pool, **self.pool_files)

    def round_prompts(self, round_index: int) -> list[PromptRecord]:
        """The prompts of round `round_index` on this rank: a seeded sample of the shard."""
        rng = random.Random(f"{self.seed}:{round_index}")
        n = min(self.prompts_per_round, len(self.shard))
        return rng.sample(self.shard, n)

    def set_pairs(self, pairs: list[TrainPair], round_index: int) -> None:
        """Hand the round's pairs over; batches fetched from now on come from them."""
        self.pairs = list(pairs)
        self.round = round_index
        self.batches_done = self.start_batch = 0
        self._shuffle()
        usage = self.pair_usage()
        if usage["pairs_unused"]:
            log.warning("round %d: %d of %d pairs will not be trained (the round serves %d; raise "
                        "rollout.every_n_steps or data.batch_size, or lower data.prompts_per_round)",
                        round_index, usage["pairs_unused"], len(self.pairs), self.items_per_round)

    def _shuffle(self) -> None:
        rng = random.Random(f"{self.seed}:pairs:{self.round}")
        self.order = []
        while self.pairs and len(self.order) < self.items_per_round:
            self.order += rng.sample(range(len(self.pairs)), len(self.pairs))
        del self.order[self.items_per_round:]

    def pair_usage(self) -> dict[str, int]:
        """How often this round trains its pairs: the fewest and most uses of a pair, and how many
        pairs it never serves (a round serves a fixed number of items, whatever was kept)."""
        uses = [0] * len(self.pairs)
        for i in self.order:
            uses[i] += 1
        return {"pair_uses_min": min(uses, default=0), "pair_uses_max": max(uses, default=0),
                "pairs_unused": uses.count(0)}

    @property
    def items_per_round(self) -> int:
        return self.steps_per_round * self.accumulate_grad_batches * self.batch_size

    def train_dataloader(self) -> DataLoader:
        # num_workers=0: items are read from `self.pairs` at fetch time, after the round ran.
        return RoundLoader(RoundDataset(self, self.items_per_round), batch_size=self.batch_size,
                           sampler=RoundSampler(self), collate_fn=self.collator, num_workers=0)

    def state_dict(self) -> dict:
        """The round in progress: its index (the pool cursor: a round's prompts are a function
        of seed and index), its pairs with reference log-probs and the batches already trained."""
        mine = [pair_to_dict(p) for p in self.pairs]
        # Lightning writes rank 0's copy of this state, but every rank holds different pairs:
        # gather them all (every rank calls state_dict when a checkpoint is saved).
        world = _world_size()
        by_rank = [mine] if world == 1 else [None] * world
        if world > 1:
            torch.distributed.all_gather_object(by_rank, mine)
        return {"round": self.round, "pairs": by_rank, "batches_done": self.batches_done,
                "seed": self.seed, "pool_size": len(self.records)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_pools()
        if (state_dict["seed"], state_dict["pool_size"]) != (self.seed, len(self.records)):
            raise ValueError(
                f"checkpoint was written with seed {state_dict['seed']} and a pool of "
                f"{state_dict['pool_size']} prompts; this run has seed {self.seed} and "
                f"{len(self.records)} prompts in {self.train_pool}: resume with the same run.seed "
                f"and data.train_pool")
        world, rank = _world_size(), (self.trainer.global_rank if self.trainer else 0)
        if len(state_dict["pairs"]) != world:
            raise ValueError(f"checkpoint was written by {len(state_dict['pairs'])} ranks; this run "
                             f"has {world}: resume with the same run.devices and run.num_nodes")
        by_id = {r.id: r for r in self.records}
        self.pairs = [pair_from_dict(d, by_id) for d in state_dict["pairs"][rank]]
        self.round = state_dict["round"]
        self._shuffle()
        self.batches_done = self.start_batch = state_dict["batches_done"]
