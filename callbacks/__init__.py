"""Lightning callbacks of rdpo (this folder is installed as ``rdpo.callbacks``)."""

from rdpo.callbacks.heldout import HeldoutEvaluation
from rdpo.callbacks.progress import RoundProgressBar
from rdpo.callbacks.round import RubricScoringCallback

__all__ = ["HeldoutEvaluation", "RoundProgressBar", "RubricScoringCallback"]
