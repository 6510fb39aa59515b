"""The next round, built while this one trains (``rollout.async_rounds``).

When round r starts, the policy's trainable weights are kept (`Snapshot`) and round r+1's
prompts are sampled from them: with the transformers engine on the trainer's thread, right
away (sampling needs the model, the device and the global RNG the training step uses); with
the vLLM engine on a thread of its own, from the adapter published at that step. A
`RoundPipeline` judges the answers on its judge thread while round r trains. When round r+1
starts, `AheadRound.take` waits for what is left of the judging and runs the reference pass
on the trainer's thread (the model is needed; the reference is the base, or with
dpo.reference=round_start the policy as round r+1 starts, as in a synchronous round).

Round r+1's pairs are then one round off-policy: sampled by the policy of round r's start.
The snapshot (the adapter: a few MB on the toy, ~0.6 GB in float32 for r=64 on a 7B model,
held in CPU memory) goes into the checkpoint, so a run resumed while round
r+1 was being built samples it again from the same weights with the same seed: the same
rollouts, the same pairs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from rdpo.rounds import BuiltRound, RoundPipeline


@dataclass
class Snapshot:
    """The policy a round is sampled from: its trainable weights when round `round` started
    at optimizer step `step`, to sample round `target` (= round + 1)."""

    round: int
    step: int
    target: int
    weights: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: torch.nn.Module, round_index: int, step: int) -> Snapshot:
        weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                   if p.requires_grad}
        return cls(round_index, step, round_index + 1, weights)

    @property
    def record(self) -> dict:
        """What the round files and the history row say about the sampling policy."""
        return {"round": self.round, "step": self.step}

    def state(self) -> dict:
        return {"round": self.round, "step": self.step, "target": self.target,
                "weights": self.weights}

    @classmethod
    def from_state(cls, state: dict | None) -> Snapshot | None:
        return None if not state else cls(state["round"], state["step"], state["target"],
                                           state["weights"])


@contextlib.contextmanager
def policy_weights(model: torch.nn.Module, snapshot: Snapshot | None) -> Iterator[None]:
    """`model` with the snapshot's trainable weights in place of its own for the block (None:
    as it is). Its own weights come back afterwards, bit for bit."""
    if snapshot is None:
        yield
        return
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(snapshot.weights):
        missing = sorted(set(params) ^ set(snapshot.weights))[:3]
        raise ValueError(f"the checkpoint's sampling policy (round {snapshot.round}) does not fit "
                         f"this model's trainable weights (e.g. {', '.join(missing)}): resume "
                         "with the same model and lora settings")
    own = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(snapshot.weights[n])
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(own[n])


class AheadRound:
    """Round `index`, sampled from `snapshot` and being judged by `pipeline` (entered) while
    the trainer trains. `feed`, when given, is the sampling to run on a thread of its own (the
    vLLM engine): it `add`s each rollout to the pipeline and stops early once the event it is
    given is set (`close`). `cost` is the round's
    `rdpo.cost.RoundCost`, started when its judging started."""

    def __init__(self, index: int, snapshot: Snapshot, pipeline: RoundPipeline, cost,
                 feed: Callable[[threading.Event], None] | None = None):
        self.index, self.snapshot, self.pipeline, self.cost = index, snapshot, pipeline, cost
        self._error: BaseException | None = None
        self._thread = None
        self._stop = threading.Event()
        if feed is not None:
            self._thread = threading.Thread(target=self._run, args=(feed,), daemon=True,
                                            name=f"rdpo-ahead-{index}")
            self._thread.start()

    def _run(self, feed: Callable[[threading.Event], None]) -> None:
        start = time.perf_counter()
        try:
            feed(self._stop)
        except BaseException as err:  # raised on the trainer's thread by `take`
            self._error = err
        finally:
            self.pipeline.seconds["sampling"] = time.perf_counter() - start

    def take(self) -> BuiltRound:
        """Wait for the sampling thread and the judge, then run the reference pass (on this
        thread: it must be the model's). Raises what the sampling or the judge raised."""
        try:
            if self._thread is not None:
                self._thread.join()
                if self._error is not None:
                    raise self._error
            built = self.pipeline.finish()
        except BaseException as err:
            self.pipeline.__exit__(type(err), err, err.__traceback__)
            raise
        self.pipeline.__exit__(None, None, None)
        return built

    def close(self) -> None:
        """Abandon the round (the run stops, or it is not needed): the sampling thread stops at
        its next prompt, the chunks not yet judged are cancelled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(BaseException):
            self.pipeline.__exit__(RuntimeError, RuntimeError("abandoned"), None)


__all__ = ["AheadRound", "Snapshot", "policy_weights"]
