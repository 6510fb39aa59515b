"""Where the toy's pools, base model and warm-started policy live in the cache.

It imports nothing from rdpo, so the config (which fills a toy run's model and pool paths from
it) reaches no other part of the demo: tests/test_layers.py checks both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Bump when the task, the tiny model or the warm start changes in a way the settings don't show.
TOY_VERSION = 5  # 3: records carry an `outcome` check (outcome baseline); 4: toy.head_dim;
# 5: tiny Qwen3-VL with a deepstack layer, tiny Qwen video processor at the image pixel budget


@dataclass(frozen=True)
class ToyPaths:
    task: Path
    train_pool: Path
    heldout_pool: Path
    warmstart_pool: Path
    model: Path
    policy: Path


def _key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def toy_paths(toy) -> ToyPaths:
    """Where the toy's pools, base model and warm-started policy live (built or not); `toy`: a
    `rdpo.config.ToyConfig`."""
    s = asdict(toy)
    root = Path(s.pop("cache_dir")).expanduser().resolve()
    # The easy task's key leaves `task` out, so caches built before toy.task existed still match.
    task_key = _key({k: s[k] for k in ("n_train", "n_heldout", "task_seed")} | {"v": TOY_VERSION}
                    | ({"task": s["task"]} if s["task"] != "easy" else {}))
    task = root / "tasks" / task_key
    model_key = _key({k: s[k] for k in ("family", "hidden_size", "layers", "head_dim")}
                     | {"task": task_key})
    warm_key = _key({k: s[k] for k in ("warmstart_steps", "warmstart_lr", "flaw_rate")})
    model = root / "models" / model_key / "base"
    return ToyPaths(task, task / "train.jsonl", task / "heldout.jsonl", task / "warmstart.jsonl", model,
                    model.parent / f"warm-{warm_key}")
