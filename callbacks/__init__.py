"""Lightning callbacks of rdpo (this folder is installed as ``rdpo.callbacks``)."""

from rdpo.callbacks.scoring import RubricScoringCallback

__all__ = ["RubricScoringCallback"]
