"""``python tests/deepspeed_probe.py --out DIR --config ... [key=value ...]``: `python -m rdpo.fit`
with a probe callback for tests/test_deepspeed.py, on every rank:

- as training starts (after the held-out "before" evaluation) and after training, how many
  weights ZeRO-3 slices, how many of their values this rank holds (0: released), and how many
  module hooks ZeRO-3 has (its per-module gathering is on again after a rollout);
- after training, the policy's greedy answers to the first two held-out prompts, sampled inside
  the trainer as rollouts are (`rdpo.callbacks.sampling.sample`: weights gathered under ZeRO-3).

Each rank writes ``DIR/probe-rank-K.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "samples_per_prompt": 1}


def zero3_state(trainer, model) -> dict:
    """Sliced weights, the values of them held here, and ZeRO-3's module hooks (empty if not
    ZeRO-3)."""
    if not getattr(trainer.strategy, "zero_stage_3", False):
        return {}
    from rdpo.strategy import _parameter_offload

    sliced = [p for p in model.parameters() if not p.ds_persist]
    offload = _parameter_offload(trainer.strategy.deepspeed_engine)
    return {"sliced": len(sliced), "sliced_values": sum(p.ds_numel for p in sliced),
            "held_values": sum(p.data.numel() for p in sliced),
            "hooks": len(offload.forward_hooks)}


class Probe(L.Callback):
    def __init__(self, out: Path):
        self.out = out
        self.state: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state["start"] = zero3_state(trainer, pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        from rdpo.callbacks.sampling import sample

        from rdpo.config import RolloutConfig

        records = trainer.datamodule.heldout[:2]
        rollouts = sample(trainer, pl_module, records, RolloutConfig(**GREEDY), seed=0)
        self.state |= {"end": zero3_state(trainer, pl_module.model),
                       "greedy": {r.record.id: list(r.token_ids[0]) for r in rollouts}}
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"probe-rank-{trainer.global_rank}.json"
        path.write_text(json.dumps(self.state) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args, rest = parser.parse_known_args(argv)
    init = L.Trainer.__init__

    def with_probe(self, *a, callbacks=None, **kw):
        init(self, *a, callbacks=[*(callbacks or []), Probe(args.out)], **kw)

    L.Trainer.__init__ = with_probe
    from rdpo.fit import main as fit_main

    return fit_main(rest)


if __name__ == "__main__":
    sys.exit(main())
