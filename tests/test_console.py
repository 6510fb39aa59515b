"""The console: each message once, third-party noise off by default and on with -v, --quiet."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from rdpo import console

NOISE_SAMPLES = [
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
    "Please make sure you already `pip install kernels`",
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "The `srun` command is available on your system but is not used. HINT: If your intention",
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
    "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
    "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
]


@pytest.fixture
def restore_logging():
    """Undo what `console.setup` does to the process-wide logging state."""
    root = logging.getLogger()
    saved = root.level, list(root.handlers), logging.getLogger("rdpo").level
    yield
    root.setLevel(saved[0])
    for handler in list(root.handlers):
        if handler not in saved[1]:
            root.removeHandler(handler)
    logging.getLogger("rdpo").setLevel(saved[2])


def _record(message: str, name: str = "x", level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


@pytest.mark.parametrize("message", NOISE_SAMPLES)
def test_noise_filter_drops_each_known_notice(message):
    assert not console.NoiseFilter().filter(_record(message))


def test_noise_filter_keeps_everything_else():
    keep = ["GPU available: False, used: False", "round 0: mean score 0.464",
            "prefix sharing off (no 4-D masks): chosen and rejected are encoded separately"]
    assert all(console.NoiseFilter().filter(_record(m)) for m in keep)


@pytest.mark.parametrize("message", NOISE_SAMPLES[2:])
def test_noise_warnings_are_silenced_and_others_are_not(message):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.silence_warnings()
        warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("a warning about your own settings", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning about your own settings"]


def test_lightning_messages_reach_the_console_once(restore_logging):
    import lightning  # noqa: F401  (adds Lightning's own console handler)

    stream = io.StringIO()
    console.setup(console.DEFAULT, stream)
    console.setup(console.DEFAULT, stream)  # twice: still one handler
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "rdpo-console"]
    assert len(ours) == 1
    assert not [h for h in logging.getLogger("lightning").handlers
                if type(h) is logging.StreamHandler]
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    logging.getLogger("lightning.pytorch").info(NOISE_SAMPLES[1])
    logging.getLogger("rdpo").info("round 0: mean score 0.5")
    logging.getLogger("rdpo").debug("a detail")
    assert stream.getvalue() == "GPU available: False\nround 0: mean score 0.5\n"


def test_verbose_shows_notices_and_debug(restore_logging):
    stream = io.StringIO()
    console.setup(console.VERBOSE, stream)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(NOISE_SAMPLES[0])
    logging.getLogger("rdpo").debug("a detail")
    assert stream.getvalue().splitlines() == [NOISE_SAMPLES[0], "a detail"]


def test_quiet_prints_warnings_only(restore_logging):
    import lightning  # noqa: F401

    stream = io.StringIO()
    console.setup(console.QUIET, stream)
    logging.getLogger("lightning.pytorch").info("GPU available: False")  # its own level: INFO
    logging.getLogger("rdpo").info("round 0: mean score 0.5")
    logging.getLogger("rdpo").warning("run.dir holds a checkpoint")
    assert stream.getvalue() == "run.dir holds a checkpoint\n"


def test_flags():
    import argparse

    parser = argparse.ArgumentParser()
    console.add_arguments(parser)
    assert console.verbosity(parser.parse_args([])) == console.DEFAULT
    assert console.verbosity(parser.parse_args(["-q"])) == console.QUIET
    assert console.verbosity(parser.parse_args(["--verbose"])) == console.VERBOSE
    with pytest.raises(SystemExit):
        parser.parse_args(["-q", "-v"])
