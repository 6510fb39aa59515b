"""Session-wide tiny fixtures: one 2-layer Qwen2-VL with its processor, small toy pools, and
the warm-started small toy of the end-to-end tests."""

import pytest
import torch

from rdpo.demo import toy
from rdpo.demo.tiny import build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-init tiny Qwen2-VL (model + processor) saved once per session."""
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_qwen2_vl"), toy.corpus())


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_dir):
    """(model, processor) loaded from `tiny_dir`: float32, eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def toy_pools(tmp_path_factory):
    """`rdpo.demo.toy.ToyPools` of the shapes task with 16 train and 8 held-out prompts."""
    return toy.write_pools(tmp_path_factory.mktemp("toy_pools"), n_train=16, n_heldout=8, seed=0)


@pytest.fixture(scope="session")
def small_toy_cache(tmp_path_factory):
    """The one toy cache directory of the session (other families of the small toy go here)."""
    return tmp_path_factory.getbasetemp() / "small-toy-cache"


@pytest.fixture(scope="session")
def small_toy(small_toy_cache):
    """The small toy of the end-to-end tests (tests/small_toy.py), built once per session:
    `SmallToy` with the cache directory and the paths of model, policy and pools."""
    from small_toy import build_small_toy

    return build_small_toy(small_toy_cache)


@pytest.fixture(scope="session")
def zero2_run(small_toy, tmp_path_factory):
    """The small toy's run under DeepSpeed ZeRO-2 on two CPU ranks (tests/deepspeed_runs.py):
    tests/test_deepspeed.py checks it, tests/test_slurm.py preempts the same run under SLURM."""
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    from deepspeed_runs import fit_deepspeed
    from scale_runs import log_text

    run = tmp_path_factory.mktemp("zero2") / "run"
    proc = fit_deepspeed(run, small_toy.cache, 2)
    assert proc.returncode == 0, log_text(run)
    return run
