"""Evaluation: a policy's mean rubric score and essential pass rate on held-out prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rdpo.pool import PromptRecord
from rdpo.rollout import SamplingSettings, generate
from rdpo.rounds import score_rollouts


def evaluate_policy(model, processor, records: Sequence[PromptRecord], judge,
                    settings: SamplingSettings, aggregation: str = "lexicographic",
                    seed: int = 0) -> dict:
    """Sample ``settings.num_samples`` responses per prompt and judge them.

    Returns ``rubric_score`` (mean score over all responses), ``essential_pass_rate`` (fraction
    of responses meeting every essential criterion), the counts, and ``unknown_verdicts``.
    Sampling is seeded (and the global RNG state restored), so the same policy scores the same.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        scored = score_rollouts(judge, generate(model, processor, records, settings), aggregation)
    finally:
        torch.random.set_rng_state(state)
    scores = [s for item in scored for s in item.scores]
    n = max(1, len(scores))
    return {
        "rubric_score": sum(s.value for s in scores) / n,
        "essential_pass_rate": sum(s.essential_pass is True for s in scores) / n,
        "prompts": len(scored),
        "responses": len(scores),
        "unknown_verdicts": sum(s.unknown for s in scores),
        "temperature": settings.temperature,
        "samples_per_prompt": settings.num_samples,
    }
