"""Reference log-probs computed once per pair: base (adapters off), round_start, frozen copy."""

import copy

import pytest
import torch

from rdpo.config import ModelConfig
from rdpo.engine.collate import PairCollator
from rdpo.engine.encode import collate_sequences, encode_prompt
from rdpo.engine.logps import sequence_logps
from rdpo.model import load_policy
from rdpo.pairs import Pair, PairSelection
from rdpo.pool import load_pool
from rdpo.rollout import Rollout
from rdpo.rounds import ScoredRollout, reference_logps

CHOSEN = ["The circle is red.", "There are two shapes."]
REJECTED = ["A dog.", "Blue blue blue square triangle."]


@pytest.fixture(scope="module")
def setup(tiny_dir, toy_pools):
    model, processor = load_policy(ModelConfig(path=str(tiny_dir)))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: LoRA B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    records = load_pool(toy_pools.train)[:2]
    scored = [ScoredRollout(Rollout(r, [c, j]), [], []) for r, c, j in zip(records, CHOSEN, REJECTED, strict=True)]
    selection = PairSelection([Pair(r.id, c, j, 0, 1, 1.0, 0.0)
                               for r, c, j in zip(records, CHOSEN, REJECTED, strict=True)], {})
    return model, processor, records, scored, selection


def direct(model, processor, records):
    prompts = [encode_prompt(processor, r) for r in records]
    with torch.no_grad():
        return sequence_logps(model, collate_sequences(processor, prompts * 2, CHOSEN + REJECTED)).chunk(2)


@pytest.mark.parametrize("packed", [True, False])
def test_base_and_round_start(setup, packed):
    model, processor, records, scored, selection = setup
    collator = PairCollator(processor, packed=packed)
    base = reference_logps(model, collator, scored, selection, reference="base")
    now = reference_logps(model, collator, scored, selection, reference="round_start")
    with model.disable_adapter():
        want_base = direct(model, processor, records)
    want_now = direct(model, processor, records)
    got_base = (torch.tensor([p.ref_chosen_logp for p in base]), torch.tensor([p.ref_rejected_logp for p in base]))
    got_now = (torch.tensor([p.ref_chosen_logp for p in now]), torch.tensor([p.ref_rejected_logp for p in now]))
    for got, want in ((got_base, want_base), (got_now, want_now)):
        torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)
    assert (got_base[0] - got_now[0]).abs().min() > 1e-3  # the adapter really changes them
    assert [p.chosen for p in base] == CHOSEN and base[0].record.id == records[0].id


def test_frozen_reference_model_for_full_finetuning(setup, tiny_model_and_processor):
    model, processor, records, scored, selection = setup
    plain, _ = tiny_model_and_processor  # no adapters: full fine-tuning keeps a frozen copy
    frozen = copy.deepcopy(plain)
    pairs = reference_logps(plain, PairCollator(processor), scored, selection, reference="base",
                            reference_model=frozen)
    want = direct(frozen, processor, records)
    torch.testing.assert_close(torch.tensor([p.ref_chosen_logp for p in pairs]), want[0], atol=1e-4, rtol=1e-5)
    with pytest.raises(TypeError, match="PEFT model"):
        reference_logps(plain, PairCollator(processor), scored, selection, reference="base")
    with pytest.raises(ValueError, match="not one of"):
        reference_logps(model, PairCollator(processor), scored, selection, reference="policy")
