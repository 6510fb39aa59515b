"""What the command-line tools print: every message once, no third-party noise, three levels.

``setup(verbosity)`` configures logging for a CLI (`rdpo.fit`, `rdpo.tools.try_policy`, `rdpo.tools.export`):
one handler on the root logger, so a message reaches the terminal once. Lightning adds its own
console handler to the ``lightning`` logger when it is imported and still lets records
propagate to the root: with a root handler too, every Lightning message was printed twice
(``INFO: GPU available`` then ``GPU available``). `route_lightning` removes that handler; `fit`
calls it right after importing Lightning, so library users get the fix as well.

Third-party messages a user cannot act on (`NOISE`) are dropped at the default level and shown
with ``-v``; ``--quiet`` prints warnings and errors only. This module imports nothing heavy.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

QUIET, DEFAULT, VERBOSE = -1, 0, 1

NOISE = (
    # bitsandbytes >= 0.49 on AVX512-BF16 CPUs: an optional faster 4-bit kernel from the
    # `kernels` package; the slower built-in one is used instead.
    r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # Lightning's advertisements of its cloud products.
    r"💡 Tip: For seamless",
    # Lightning on a host with SLURM's tools but outside a job (a login node, a dev box); jobs
    # go through slurm/fit.sbatch, which does use srun.
    r"The `srun` command is available on your system but is not used",
    # torch 2.14 deprecates pytree's LeafSpec, which Lightning 2.6 still uses internally.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # transformers 5 renamed it; PEFT 0.21 still reads the old name on every model it wraps.
    r"`is_gradient_checkpointing` is deprecated",
    # DeepSpeed (imported by transformers' integrations) on a machine without a GPU; Lightning's
    # "GPU available: False" already says what matters.
    r"Setting accelerator to CPU\. If you have GPU or other accelerator",
)
"""Messages (regular expressions, matched at the start) hidden unless ``-v``: each names a
version of a dependency and has nothing a user of rdpo can change."""

_NOISE = re.compile("|".join(f"(?:{n})" for n in NOISE))
_HANDLER_NAME = "rdpo-console"
_verbosity = VERBOSE
"""What `setup` was last asked for; VERBOSE (show everything) when a library user never called it."""


def verbose() -> bool:
    """Whether third-party tools may print their own summaries (``-v``, or no `setup` at all)."""
    return _verbosity >= VERBOSE


class _Handler(logging.StreamHandler):
    """Writes each record above any open progress bar (tqdm's `write` clears and redraws it),
    so a message in the middle of a phase neither breaks the bar's line nor is broken by it.
    Without a stream of its own it writes to whatever ``sys.stderr`` is at the time (a test's
    capture, a redirected console), never to a stream closed since."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self._own_stream = stream is not None

    def _target(self):
        return self.stream if self._own_stream else sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self._target())
            self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        target = self._target()
        if target is not None and hasattr(target, "flush"):
            target.flush()


class NoiseFilter(logging.Filter):
    """Drops log records whose message matches `NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not _NOISE.match(message.lstrip())


def silence_warnings() -> None:
    """`warnings` filters for the `NOISE` that arrives through ``warnings.warn`` (Lightning's
    rank_zero_warn, torch and transformers deprecations); FutureWarnings of transformers and
    PEFT internals too: they name transformers' next major version, not rdpo's settings."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for module in (r"transformers(\..*)?", r"peft(\..*)?"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def setup(verbosity: int = DEFAULT, stream=None) -> None:
    """Logging of a command-line tool: messages as plain lines on `stream` (stderr), once.

    `verbosity`: `QUIET` (warnings and errors), `DEFAULT` (rdpo's progress, Lightning's notices,
    no `NOISE`), `VERBOSE` (everything, debug messages of rdpo included). Calling it again
    replaces the handler rather than adding a second one.
    """
    global _verbosity
    _verbosity = verbosity
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = _Handler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = {QUIET: logging.WARNING, DEFAULT: logging.INFO}.get(verbosity, logging.DEBUG)
    # Lightning sets its loggers' own levels, and records propagated from them skip the root
    # logger's level: the handler's level is what keeps --quiet quiet.
    handler.setLevel(level)
    root.setLevel(logging.INFO if level == logging.DEBUG else level)
    logging.getLogger("rdpo").setLevel(level)
    if verbosity < VERBOSE:
        handler.addFilter(NoiseFilter())
        silence_warnings()
        _quiet_transformers()
        # DeepSpeed prints through its own handler (no propagation): filtered on its logger,
        # which applies to every record it logs, even before deepspeed is imported.
        deepspeed = logging.getLogger("DeepSpeed")
        if not any(isinstance(f, NoiseFilter) for f in deepspeed.filters):
            deepspeed.addFilter(NoiseFilter())
    root.addHandler(handler)
    route_lightning()


def _quiet_transformers() -> None:
    # "Loading weights: 100%" bars of every from_pretrained: one per model, nothing to read.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def route_lightning() -> None:
    """Send Lightning's messages through the root logger only (see the module docstring).

    A no-op until Lightning is imported, and when the root logger has no handler (then
    Lightning's own handler is the only one and stays)."""
    if "lightning" not in sys.modules or not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def add_arguments(parser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` on an argparse parser (read with `verbosity`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print warnings and errors only (no progress display)")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="print everything: debug messages and third-party notices")


def verbosity(args) -> int:
    return QUIET if args.quiet else VERBOSE if args.verbose else DEFAULT
