"""The small toy every end-to-end test trains on, and the one list of small-run overrides.

The ``small_toy`` session fixture (tests/conftest.py) builds it once per session: the tiny
Qwen2-VL, a 150-step warm start (enough that most sampled answers end within the token
limit: answers cut there are never paired) and the 16/8-prompt pools, cached in one directory.
Another family (``toy.family=qwen2_5_vl``) built into the same cache shares its pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/quickstart.yaml"

SMALL_TOY = ["toy.n_train=16", "toy.n_heldout=8", "toy.warmstart_steps=150", "toy.head_dim=32",
             "toy.warmstart_lr=3e-3", "toy.flaw_rate=0.5"]
"""The toy settings: 16 training and 8 held-out prompts, a short warm start with many flaws."""

SMALL = [*SMALL_TOY, "run.progress_bar=false", "rollout.samples_per_prompt=4",
         "data.batch_size=4", "data.prompts_per_round=16", "dpo.lr=5e-3",
         "eval.samples_per_prompt=2", "rollout.max_new_tokens=24"]
"""Small-run overrides of configs/quickstart.yaml: every prompt each round, 4 samples of up
to 24 tokens (shorter cuts most answers of the barely warm-started toy, and truncated answers
are never paired); each test adds its own run length (dpo.max_steps, rollout.every_n_steps)."""


@dataclass(frozen=True)
class SmallToy:
    """The built small toy: its cache directory and paths (`rdpo.demo.warmstart.ToyPaths`)."""

    cache: Path
    paths: object

    @property
    def overrides(self) -> list[str]:
        """`SMALL` with this cache: fit reuses the built toy."""
        return [*SMALL, f"toy.cache_dir={self.cache}"]


def build_small_toy(cache: Path, *extra: str) -> SmallToy:
    """Build (or reuse) the small toy in `cache`; `extra` toy overrides (e.g. the family)."""
    from rdpo.config import load_config
    from rdpo.demo.warmstart import prepare_toy

    cfg = load_config(QUICKSTART, [*SMALL_TOY, "run.dir=unused", f"toy.cache_dir={cache}", *extra])
    return SmallToy(Path(cache), prepare_toy(cfg.toy))
