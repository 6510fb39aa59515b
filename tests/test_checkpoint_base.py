"""A checkpoint remembers which base weights it was trained on (`base_fingerprint`), so a
resume cannot silently continue an adapter on another base of the same shapes."""

import copy

import pytest
import torch
from rdpo.callbacks.checkpoint import RoundCheckpoint, base_fingerprint


@pytest.fixture(scope="module")
def frozen(tiny_model_and_processor):
    model = copy.deepcopy(tiny_model_and_processor[0])
    model.requires_grad_(False)
    return model


def test_fingerprint_ignores_the_load_dtype_but_not_the_weights(frozen):
    fp32 = base_fingerprint(frozen)
    assert len(fp32) == 16
    assert base_fingerprint(copy.deepcopy(frozen).to(torch.bfloat16)) == fp32
    other = copy.deepcopy(frozen)
    first = min(n for n, _ in other.named_parameters())  # a tensor the sample always reads
    with torch.no_grad():
        dict(other.named_parameters())[first].add_(0.01)
    assert base_fingerprint(other) != fp32


def test_trainable_weights_are_not_part_of_it(frozen):
    trained = copy.deepcopy(frozen)
    name, param = next(iter(trained.named_parameters()))
    param.requires_grad_(True)
    with torch.no_grad():
        param.add_(1.0)  # training changes it: the fingerprint must not
    reference = copy.deepcopy(frozen)
    dict(reference.named_parameters())[name].requires_grad_(True)
    assert base_fingerprint(trained) == base_fingerprint(reference)
    assert base_fingerprint(torch.nn.Linear(2, 2)) == ""  # nothing frozen: nothing to compare


def test_a_checkpoint_of_another_base_is_refused(tmp_path):
    saved = RoundCheckpoint(tmp_path, 1, base="aaaa").state_dict()
    with pytest.raises(ValueError, match=r"another base model .*aaaa.*bbbb.*run.resume=none"):
        RoundCheckpoint(tmp_path, 1, base="bbbb").load_state_dict(saved)
    RoundCheckpoint(tmp_path, 1, base="aaaa").load_state_dict(saved)  # same base: resumes
    # Checkpoints of earlier versions carry no fingerprint: resumed as before.
    RoundCheckpoint(tmp_path, 1, base="bbbb").load_state_dict({**saved, "base": ""})
