"""The main job: ``python -m rdpo.fit --config CONFIG.yaml [key=value ...]``.

`fit(cfg)` does the work and returns a `FitResult`; the CLI only parses and calls it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rdpo import console, rundir
from rdpo.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # the heavy imports happen in `build`, after the inputs are checked
    import lightning as L
    import torch

    from rdpo.callbacks import HeldoutEvaluation, RubricScoringCallback
    from rdpo.callbacks.checkpoint import RoundCheckpoint
    from rdpo.data import OnPolicyDataModule
    from rdpo.module import RubricDPOModule

log = logging.getLogger("rdpo")


@dataclass
class FitResult:
    """What a run produced: where, the before/after evaluation and the per-round numbers."""

    run_dir: Path
    adapter_dir: Path
    eval: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: Path | None = None
    preempted: bool = False
    """The run stopped on the preemption signal after saving a checkpoint (nothing else written)."""


def _judge(cfg: Config):
    """The judge `cfg.judge` describes; rounds use its `strategy` (pairs.strategy) for pairs.
    A rule judge may simulate a model judge's errors (the toy's `rdpo.demo.simjudges`)."""
    if cfg.judge.kind == "rule":
        from rdpo.demo.simjudges import make_simulated

        return make_simulated(cfg.judge, cfg.toy, cfg.run.seed, cfg.pairs.strategy)
    from rdpo.judging.judges import make_judge

    return make_judge(cfg.judge, strategy=cfg.pairs.strategy)


def _audit_judge(cfg: Config):
    """judge.audit's judge (None without one): rubric verdicts whatever pairs.strategy is; a rule
    audit may simulate errors as the training judge can, with errors of its own (seed + 1)."""
    audit = cfg.judge.audit
    if audit is None:
        return None
    if audit.kind == "rule":
        from rdpo.demo.simjudges import make_simulated

        return make_simulated(audit, cfg.toy, cfg.run.seed + 1, "rubric")
    from rdpo.judging.judges import make_judge

    return make_judge(audit, strategy="rubric")


def _frozen_copy(model):
    """The reference of full fine-tuning: the starting weights, frozen."""
    import copy

    ref = copy.deepcopy(model).eval()
    return ref.requires_grad_(False)


def _eval_judge(cfg: Config, judge):
    """The held-out rubric score is a yardstick: a simulated judge's errors stay out of it."""
    from rdpo.judging.judges import RuleJudge

    return RuleJudge() if cfg.judge.kind == "rule" else judge


def _ground_truth(cfg: Config, heldout):
    """The toy's ground truth (`rdpo.demo.truth`) for the held-out evaluation; None off the toy."""
    if not cfg.toy.enabled:
        return None
    from rdpo.demo.truth import GroundTruth

    truth = GroundTruth.for_toy(cfg.toy)
    try:
        truth.check_records(heldout)
    except ValueError as err:  # data.heldout_pool set by hand beside the toy
        log.warning("no ground truth in the held-out evaluation: %s", err)
        return None
    return truth


def _judge_chunk(cfg: Config) -> int:
    """Prompts per judge call: enough responses to fill the judge's concurrency (openai) or
    batch (transformers), so the verdicts reach the cache call by call; rule judges: all."""
    per_call = {"openai": cfg.judge.concurrency, "transformers": cfg.judge.batch_size}
    if cfg.judge.kind not in per_call:
        return 0
    return max(1, -(-per_call[cfg.judge.kind] // cfg.rollout.samples_per_prompt))


def _preemption_signal() -> int | None:
    """SIGUSR1 under SLURM (sent to the tasks, or to slurm/fit.sbatch, which forwards it), else
    none."""
    return signal.SIGUSR1 if "SLURM_JOB_ID" in os.environ else None


def _can_pack(cfg: Config, model) -> bool:
    from rdpo.engine.packing import packing_support

    if not cfg.dpo.prefix_sharing:
        return False
    reason = packing_support(model)
    if reason:
        log.warning("prefix sharing off (%s): chosen and rejected are encoded separately", reason)
    return reason is None


def _vision_cache_mb(cfg: Config) -> int:
    if cfg.data.vision_cache_mb and cfg.run.strategy == "deepspeed" and cfg.run.deepspeed_stage == 3:
        # ZeRO-3 gathers each weight in a collective: a rank encoding a prompt its cache dropped
        # would run the vision tower while the others do not.
        log.info("data.vision_cache_mb: off under DeepSpeed ZeRO-3 (every step runs the vision tower)")
        return 0
    return cfg.data.vision_cache_mb


def check_run_dir(run_dir: Path) -> None:
    """Fail now, not after an hour, when the run directory cannot be written."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))  # 1 MiB: a full disk fails here, not at the first checkpoint
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise RunDirError(f"run.dir={run_dir}: cannot write there ({err.strerror or err}); "
                          f"choose another run.dir or free the disk") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


class RunDirError(OSError):
    """The run directory cannot be written."""


def resume_path(cfg: Config) -> Path | None:
    """The checkpoint `run.resume` asks for: none, auto (the newest in run.dir, if any), a path."""
    from rdpo.callbacks.checkpoint import find_checkpoint

    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        return find_checkpoint(cfg.run.dir)
    path = Path(cfg.run.resume)
    if not path.exists():
        raise ConfigError([f"run.resume: no such checkpoint: {path}"])
    return path


def _rank_zero() -> bool:
    """Global rank 0, before Lightning has set the ranks up (from the launcher's environment:
    RANK, LOCAL_RANK, SLURM_PROCID; NODE_RANK for nodes started by hand)."""
    from lightning.pytorch.utilities import rank_zero_only

    node = os.environ.get("NODE_RANK", "0") if "RANK" not in os.environ else "0"
    return rank_zero_only.rank == 0 and node in ("", "0")


def check_start(cfg: Config, *, dry_run: bool = False) -> rundir.Start:
    """Whether this command may start in run.dir, decided before anything is written there: a
    new run needs an empty run.dir (rank 0 deletes an earlier run with run.overwrite=true;
    `rdpo.rundir.check_dir`), a resume needs its checkpoint's settings (`check_resume`).
    `dry_run` (``--check-resume``): decide only, write and delete nothing."""
    rundir.check_accept_keys(cfg)
    if dry_run and cfg.run.resume in ("none", "auto") and rundir.is_empty(Path(cfg.run.dir)):
        return rundir.Start(None)  # a new run: nothing to check (and no torch to import)
    from rdpo.callbacks.checkpoint import read_run_state

    ckpt = resume_path(cfg)
    if dry_run or _rank_zero():  # --check-resume runs outside the ranks (slurm/fit.sbatch)
        rundir.check_dir(cfg, ckpt, clear=not dry_run)
    if dry_run and ckpt is None:
        return rundir.Start(None)
    if not dry_run:
        check_run_dir(Path(cfg.run.dir))
    if cfg.toy.enabled:  # the pools' digests need the toy's pools
        from rdpo.demo.warmstart import prepare_toy

        prepare_toy(cfg.toy)
    start = rundir.Start(ckpt, rundir.run_settings(cfg))
    if ckpt is not None:
        start.saved = read_run_state(ckpt)
        start.accepted = rundir.check_resume(cfg, ckpt, (start.saved or {}).get("settings"),
                                             start.settings)
    return start


@dataclass
class Run:
    """The live pieces of a run, built from its config by `build`."""

    cfg: Config
    run_dir: Path
    checkpoint: Path | None
    model: torch.nn.Module
    processor: object
    """The model's transformers processor (any `ProcessorMixin`)."""
    module: RubricDPOModule
    datamodule: OnPolicyDataModule
    trainer: L.Trainer
    scoring: RubricScoringCallback
    heldout: HeldoutEvaluation
    checkpointer: RoundCheckpoint
    adapter_base: dict | None = None
    """LoRA: the base the adapter trains on, for rdpo_adapter.json (`rdpo.model.base_record`),
    taken before training shards the weights."""


def fit(cfg: Config) -> FitResult:
    """Train a policy with on-policy rubric DPO as `cfg` says; write the run directory."""
    start = time.perf_counter()
    run = build(cfg)
    train(run)
    return finish(run, start)


def _eval_settings(cfg: Config):
    """The held-out evaluation's sampling: the rollout's, at the evaluation's temperature and K."""
    return dataclasses.replace(cfg.rollout, temperature=cfg.eval.temperature, top_p=1.0, top_k=0,
                               samples_per_prompt=cfg.eval.samples_per_prompt)


def build(cfg: Config) -> Run:
    """Check the run directory, save the config, load the policy and wire the Lightning pieces."""
    from rdpo.preflight import check_inputs

    # Every input, before torch is imported, the run directory is made or the toy is built
    # (check_inputs skips the toy's own paths: prepare_toy makes them).
    check_inputs(cfg)
    import lightning as L
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from rdpo import loggers

    console.route_lightning()  # Lightning's own console handler would print each message twice

    from rdpo.callbacks import HeldoutEvaluation, RoundProgressBar, RubricScoringCallback
    from rdpo.callbacks.checkpoint import (
        RoundCheckpoint,
        base_fingerprint,
        base_mismatch,
        keep_metrics,
    )
    from rdpo.data import OnPolicyDataModule
    from rdpo.model import load_policy
    from rdpo.module import RubricDPOModule
    from rdpo.strategy import cluster_plugins, make_strategy

    run_dir = Path(cfg.run.dir)
    start = check_start(cfg)
    ckpt = start.checkpoint
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    elif _rank_zero():  # a resume's config.yaml is written once it is restored
        rundir.save_run_config(cfg, run_dir)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)

    model, processor = load_policy(cfg.model)
    base = base_fingerprint(model)
    saved_base = (start.saved or {}).get("base")
    if saved_base and base and saved_base != base:  # before any logger touches run.dir
        raise rundir.StartRefused([base_mismatch(ckpt, saved_base, base)])
    module = RubricDPOModule(model, processor, cfg.dpo, on_nonfinite=cfg.run.on_nonfinite)
    # Checkpoints hold the trainable weights only (`RoundCheckpoint`); the base comes from
    # model.path when a run resumes.
    module.strict_loading = False
    datamodule = OnPolicyDataModule(
        dataclasses.replace(cfg.data, vision_cache_mb=_vision_cache_mb(cfg)),
        steps_per_round=cfg.rollout.every_n_steps, seed=cfg.run.seed, packed=_can_pack(cfg, model))
    datamodule.connect(processor)
    datamodule.setup("fit")
    judge = _judge(cfg)
    server = None
    if cfg.rollout.engine == "vllm":
        from rdpo.rollout_server import VLLMRollout

        server = VLLMRollout(cfg.rollout, run_dir / "adapters")

    before_file = run_dir / "eval_before.json"
    before = (json.loads(before_file.read_text())  # measured before the interruption
              if ckpt is not None and before_file.is_file() else None)
    heldout = HeldoutEvaluation(
        datamodule.heldout[:cfg.eval.max_prompts or None], _eval_judge(cfg, judge),
        _eval_settings(cfg), aggregation=cfg.pairs.aggregation, seed=cfg.run.seed, before=before,
        run_dir=run_dir, server=server, truth=_ground_truth(cfg, datamodule.heldout),
        judge_chunk=_judge_chunk(cfg))
    scoring = RubricScoringCallback(
        judge, cfg.rollout, cfg.pairs, run_dir=run_dir, ref_batch_size=cfg.data.batch_size,
        reference=cfg.dpo.reference,
        reference_model=_frozen_copy(model) if cfg.model.finetune == "full" else None,
        seed=cfg.run.seed, judge_chunk=_judge_chunk(cfg), server=server,
        judge_settings=cfg.judge, audit=_audit_judge(cfg))

    def restored(trainer) -> None:  # training starts: a resume's checkpoint is restored
        if ckpt is not None and trainer.is_global_zero:
            rundir.save_run_config(cfg, run_dir)
            rundir.record_resume(run_dir, ckpt, trainer.global_step, start.accepted)

    checkpointer = RoundCheckpoint(
        run_dir / "checkpoints", cfg.run.checkpoint_every_n_steps or cfg.rollout.every_n_steps,
        stop_signal=_preemption_signal(), enabled=cfg.run.checkpoint, base=base,
        settings=start.settings, on_train_start=restored)
    run_loggers = loggers.make_loggers(cfg.run.loggers, cfg.logger, run_dir,
                                       resume=ckpt is not None)
    csv = loggers.csv_logger(run_loggers)
    if ckpt is not None and rank_zero_only.rank == 0 and csv is not None:
        keep_metrics(csv, ckpt)
    if rank_zero_only.rank == 0 and run_loggers:
        loggers.log_config(run_loggers, cfg)
        loggers.remember(run_loggers, run_dir)
        log.info("logging to %s", loggers.describe(run_loggers))
    progress = [RoundProgressBar()] if cfg.run.progress_bar else []
    trainer = L.Trainer(
        accelerator=cfg.run.accelerator, devices=cfg.run.devices, num_nodes=cfg.run.num_nodes,
        strategy=make_strategy(cfg, model), precision=cfg.run.precision,
        max_steps=cfg.dpo.max_steps,
        max_epochs=-1, accumulate_grad_batches=cfg.data.accumulate_grad_batches,
        gradient_clip_val=cfg.dpo.grad_clip or None, log_every_n_steps=cfg.run.log_every_n_steps,
        logger=run_loggers or False, callbacks=[heldout, scoring, checkpointer, *progress],
        plugins=cluster_plugins(),
        enable_progress_bar=cfg.run.progress_bar, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=run_dir, use_distributed_sampler=False)
    from rdpo.model import base_record

    return Run(cfg, run_dir, ckpt, model, processor, module, datamodule, trainer, scoring,
               heldout, checkpointer, adapter_base=base_record(model, cfg.model.path)
               if cfg.model.finetune == "lora" else None)


def train(run: Run) -> None:
    """`trainer.fit`; a judge that fails for good names the checkpoint to resume from."""
    from rdpo.callbacks.checkpoint import find_checkpoint
    from rdpo.judging.chat import ChatError
    from rdpo.rollout_server import RolloutServerError

    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.checkpoint)
    except ChatError as err:
        last = find_checkpoint(run.run_dir)
        raise ChatError(f"judge failed at step {run.trainer.global_step}: {err}. Last checkpoint: "
                        f"{last or 'none'}; once the judge is back, rerun with run.resume=auto "
                        f"(judged responses are cached in {run.cfg.judge.cache})") from err
    except RolloutServerError as err:
        last = find_checkpoint(run.run_dir)
        raise RolloutServerError(
            f"rollout server failed at step {run.trainer.global_step}: {err}. Last checkpoint: "
            f"{last or 'none'}; once the server is back, rerun with run.resume=auto") from err
    finally:
        if run.scoring.server is not None:  # ended or failed: unload the run's last adapter
            run.scoring.server.close()


def finish(run: Run, start: float) -> FitResult:
    """Save the adapter (or model), eval.json and the report (rank 0)."""
    cfg, run_dir, trainer = run.cfg, run.run_dir, run.trainer
    seconds = time.perf_counter() - start
    results = run.heldout.results
    if run.checkpointer.preempted:
        log.warning("preempted at step %d; rerun with run.resume=auto to continue",
                    trainer.global_step)
        return FitResult(run_dir, run_dir / "adapter", results, run.scoring.history, seconds,
                         resumed_from=run.checkpoint, preempted=True)
    # LoRA: the adapter in PEFT format; full fine-tuning: the whole model.
    adapter_dir = run_dir / ("adapter" if cfg.model.finetune == "lora" else "model")
    from rdpo.strategy import full_weights

    # ZeRO-3: every rank gathers the weights saved (LoRA: the adapter's), rank 0 writes them.
    with full_weights(trainer, run.model, trainable_only=cfg.model.finetune == "lora"):
        if trainer.is_global_zero:
            run.model.save_pretrained(adapter_dir)
    if trainer.is_global_zero:
        run.processor.save_pretrained(adapter_dir)
        if run.adapter_base is not None:  # export and generate check the base against it
            from rdpo.model import write_adapter_info

            write_adapter_info(adapter_dir, run.adapter_base)
        if "after" in results:
            rundir.atomic_write(run_dir / "eval.json", json.dumps(results, indent=2) + "\n")
            log.info("held-out: rubric score %.3f -> %.3f (gain %+.3f)",
                     results["before"]["rubric_score"], results["after"]["rubric_score"],
                     results["gain"])
    if cfg.run.report and trainer.is_global_zero:
        from rdpo.report import write_report

        try:
            report = write_report([run_dir])
            log.info("report: %s and %s", report.png, report.markdown)
        except Exception:  # the run's own files are written: a plotting failure must not fail it
            log.exception("could not write the report; retry with python -m rdpo.report %s", run_dir)
    if trainer.is_global_zero and trainer.loggers:
        from rdpo.loggers import log_results

        log_results(trainer.loggers, run_dir, results, trainer.global_step)
    result = FitResult(run_dir, adapter_dir, results, run.scoring.history,
                       time.perf_counter() - start, resumed_from=run.checkpoint)
    log.info("run finished in %.0fs: %s", result.seconds, run_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    stop = _preemption_signal()
    if stop is not None:  # a signal before training starts is held for RoundCheckpoint, not fatal
        signal.pthread_sigmask(signal.SIG_BLOCK, {stop})
    from rdpo.confighelp import render_text

    parser = argparse.ArgumentParser(prog="python -m rdpo.fit", description=__doc__.splitlines()[0],
                                     epilog=render_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--print-run-dir", action="store_true",
                        help="print run.dir as the config resolves it and exit (slurm/fit.sbatch)")
    parser.add_argument("--check-resume", action="store_true",
                        help="check that the run can start as configured (an empty run.dir, or "
                             "a checkpoint written with these settings) and exit: 0 yes, 2 no; "
                             "with --print-run-dir, print run.dir once it passes")
    console.add_arguments(parser)
    args = parser.parse_args(argv)
    console.setup(console.verbosity(args))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check_resume:
        try:
            check_start(cfg, dry_run=True)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.print_run_dir or args.check_resume:
        if args.print_run_dir:
            print(cfg.run.dir)
        return 0
    if args.quiet:
        cfg.run.progress_bar = False
    from rdpo.judging.chat import ChatError
    from rdpo.preflight import HubError

    try:
        result = fit(cfg)
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ChatError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.preempted and "SLURM_STEP_ID" not in os.environ:
        return PREEMPTED_EXIT
    # Under srun a non-zero status is a failure: --kill-on-bad-exit would kill the tasks still
    # finishing. slurm/fit.sbatch learns of the preemption from checkpoints/preempted instead.
    return 0


PREEMPTED_EXIT = 3
"""Exit status of a run stopped by the preemption signal (checkpoint saved), except in an
srun task, which exits 0 then."""


if __name__ == "__main__":
    sys.exit(main())
