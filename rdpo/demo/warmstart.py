"""The embedded default: a tiny VLM (`toy.family`) warm-started on the synthetic shapes task.

Everything is built by code and cached under ``toy.cache_dir`` by a hash of the settings that
shape it: the task pools, the random-init model with its processor, and the warm-started policy.
The warm start is supervised fine-tuning on the task with a share of deliberately flawed answers
(``toy.flaw_rate``), so the starting policy samples good and bad answers alike: exactly the
spread a rubric judge can sort into DPO pairs.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rdpo.demo.paths import TOY_VERSION, ToyPaths, toy_paths  # noqa: F401  (the toy's paths)

if TYPE_CHECKING:
    from rdpo.config import ToyConfig

log = logging.getLogger("rdpo")

WARM_THREADS = 2
"""CPU threads of every warm start (its weights depend on them: see `warm_start`)."""


def _build_atomically(target: Path, build) -> None:
    """Run ``build(tmp_dir)`` and move the result to `target`; concurrent runs race safely."""
    if target.exists():
        return
    tmp = target.with_name(f".{target.name}.tmp-{random.getrandbits(32):08x}")
    try:
        build(tmp)
        tmp.rename(target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_toy(toy: ToyConfig) -> ToyPaths:
    """Build whatever of the toy is not cached yet; return its paths."""
    from rdpo.demo import hardtoy
    from rdpo.demo import toy as easy
    from rdpo.demo.tiny import TOY_IMAGE_PIXELS, build_tiny_vlm

    task = hardtoy if toy.task == "hard" else easy

    paths = toy_paths(toy)
    pixels = TOY_IMAGE_PIXELS.get(toy.family, 112 * 56)

    def build_task(tmp: Path) -> None:
        task.write_pools(tmp, n_train=toy.n_train, n_heldout=toy.n_heldout, seed=toy.task_seed)

    def build_model(tmp: Path) -> None:
        build_tiny_vlm(tmp, task.corpus(), family=toy.family, hidden=toy.hidden_size,
                       layers=toy.layers, image_pixels=pixels, seed=toy.task_seed,
                       head_dim=toy.head_dim)

    def build_policy(tmp: Path) -> None:
        warm_start(paths.model, tmp, paths.warmstart_pool, steps=toy.warmstart_steps,
                   lr=toy.warmstart_lr, flaw_rate=toy.flaw_rate, seed=toy.task_seed,
                   task=toy.task)

    paths.task.parent.mkdir(parents=True, exist_ok=True)
    _build_atomically(paths.task, build_task)
    paths.model.parent.mkdir(parents=True, exist_ok=True)
    _build_atomically(paths.model, build_model)
    _build_atomically(paths.policy, build_policy)
    return paths


def warm_start(model_dir: Path, out_dir: Path, pool: Path, *, steps: int, lr: float,
               flaw_rate: float, seed: int, batch_size: int = 32, copies: int = 4,
               task: str = "easy") -> None:
    """Supervised fine-tuning (all weights) on the task's warm-start pool; saves model + processor.

    Runs on `WARM_THREADS` CPU threads whatever the caller set: a CPU reduction's order depends
    on the thread count, so the same settings give the same weights on machines of one kind
    (same torch, same CPU instruction set; another ISA may pick other kernels)."""
    import torch

    from rdpo.demo import hardtoy
    from rdpo.demo import toy as easy

    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(WARM_THREADS)
    try:
        _warm_start(model_dir, out_dir, pool, steps=steps, lr=lr, flaw_rate=flaw_rate, seed=seed,
                    batch_size=batch_size, copies=copies,
                    flawed=(hardtoy if task == "hard" else easy).flawed_answers)
    finally:
        torch.set_num_threads(threads)
    log.info("warm start: %d steps in %.0fs -> %s", steps, time.perf_counter() - start, out_dir)


def _warm_start(model_dir, out_dir, pool, *, steps, lr, flaw_rate, seed, batch_size, copies,
                flawed) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from rdpo.demo import toy as task
    from rdpo.engine.collate import PairCollator
    from rdpo.engine.logps import sequence_logps
    from rdpo.pool import load_pool

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    records = {r.id: r for r in load_pool(pool)}
    raw = [json.loads(line) for line in Path(pool).read_text().splitlines() if line.strip()]
    examples = task.sft_targets(raw, flaw_rate=flaw_rate, seed=seed, copies=copies, flawed=flawed)
    collator = PairCollator(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps),
                                                   pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        chosen, order = order[:batch_size], order[batch_size:]
        batch = collator.sequences([records[examples[i][0]["id"]] for i in chosen],
                                   [examples[i][1] for i in chosen])
        # Token-level NLL: the summed log-probs over all completion tokens of the batch.
        loss = -sequence_logps(model, batch).sum() / batch["completion_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.info("warm start step %d/%d: loss %.3f", step + 1, steps, loss.item())
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
