"""Experiment loggers: Lightning's CSV, TensorBoard, W&B and MLflow loggers, as run.loggers says.

Every logger gets the same things: the resolved config as hyperparameters (`log_config`), the
step metrics Lightning logs (``train/*``), the round metrics of `RubricScoringCallback`
(``round/*``, drop reasons under ``round/dropped/*``, what the round cost under
``round/cost/*`` as in cost.json, the audit judge's watch under ``round/audit/*``), the
held-out before/after of `HeldoutEvaluation` (``heldout/*``) and, at the end, the gain and the
run report (`log_results`): report.png as an image where the logger shows images (TensorBoard,
W&B), and report.png, report.md, eval.json, config.yaml, cost.json and judge_audit.json as
artifacts where it keeps files (MLflow). The CSV logger writes run.dir/logs/metrics.csv, next to those files already.

A resumed run continues the same W&B and MLflow runs: their ids are kept in
run.dir/loggers.json (`remember`); TensorBoard appends to its folder, and the CSV logger keeps the
rows before the checkpoint (`rdpo.callbacks.checkpoint.keep_metrics`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path

from rdpo.config import Config, ConfigError, LoggerConfig

log = logging.getLogger("rdpo")

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""The package each logger needs (installed by ``pip install 'rdpo[loggers]'``)."""


def _missing_packages(names: list[str]) -> list[str]:
    return [f"run.loggers: {name} needs the {PACKAGES[name]} package (pip install "
            f"{PACKAGES[name]}, or pip install 'rdpo[loggers]')" for name in names
            if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]


def mlflow_uri(settings) -> str:
    """logger.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else MLflow's own default (a
    sqlite store in the working directory; its file store now refuses to start)."""
    if settings.tracking_uri:
        return settings.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow

    return mlflow.get_tracking_uri()


IDS_FILE = "loggers.json"


def _saved_ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def make_loggers(names: list[str], settings: LoggerConfig, run_dir: str | Path, *,
                 resume: bool = False) -> list:
    """Lightning loggers for `names` (run.loggers) with `settings` (the logger section);
    `resume`: continue the W&B and MLflow runs this run directory logged to before."""
    problems = _missing_packages(names)
    if problems:
        raise ConfigError(problems)
    run_dir = Path(run_dir)
    ids = _saved_ids(run_dir) if resume else {}
    loggers = []
    for name in names:
        if name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(run_dir, name="", version="logs"))
        elif name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            # version="": the events go straight into save_dir; a resumed run adds a file there.
            loggers.append(TensorBoardLogger(settings.tensorboard.save_dir, name="", version="",
                                             default_hp_metric=False))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            w = settings.wandb
            Path(w.save_dir).mkdir(parents=True, exist_ok=True)
            # quiet: W&B's own end-of-run tables of every metric (the console's -v shows them).
            again = {"id": ids["wandb"], "resume": "allow"} if ids.get("wandb") else {}
            wandb = WandbLogger(project=w.project, name=w.name or run_dir.name, entity=w.entity,
                                offline=w.offline, save_dir=w.save_dir, tags=list(w.tags) or None,
                                log_model=False, settings=_wandb_settings(), **again)
            # Lightning 2.6 always passes anonymous=None, which wandb >= 0.19 answers with a
            # "has no effect" warning on every run; left out, nothing changes but the noise.
            if wandb._wandb_init.get("anonymous") is None:
                wandb._wandb_init.pop("anonymous", None)
            loggers.append(wandb)
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            m = settings.mlflow
            loggers.append(MLFlowLogger(experiment_name=m.experiment,
                                        run_name=m.run_name or run_dir.name,
                                        tracking_uri=mlflow_uri(m),
                                        artifact_location=m.artifact_location,
                                        run_id=ids.get("mlflow")))
    return loggers


def remember(loggers: list, run_dir: str | Path) -> None:
    """Write the W&B and MLflow run ids to run.dir/loggers.json, for a resumed run (rank 0,
    after `log_config` started those runs)."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    ids = {}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            ids["wandb"] = logger.experiment.id
        elif isinstance(logger, MLFlowLogger):
            ids["mlflow"] = logger.run_id
    if ids:
        from rdpo.rundir import atomic_write

        atomic_write(Path(run_dir) / IDS_FILE, json.dumps(ids) + "\n")


def _wandb_settings():
    import wandb

    from rdpo.console import verbose

    return wandb.Settings(quiet=not verbose())


def csv_logger(loggers: list):
    """The CSV logger among `loggers`, or None."""
    from lightning.pytorch.loggers import CSVLogger

    return next((lg for lg in loggers if isinstance(lg, CSVLogger)), None)


def log_config(loggers: list, cfg: Config) -> None:
    """The resolved config as every logger's hyperparameters (nested; each logger flattens)."""
    params = dataclasses.asdict(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)


def log_results(loggers: list, run_dir: Path, results: dict, step: int) -> None:
    """The held-out gain and the run report (files of run_dir) to every logger that takes
    them; then the loggers that buffer (TensorBoard, W&B) write everything out."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    png = run_dir / "report.png"
    for logger in loggers:
        if "gain" in results:
            logger.log_metrics({"heldout/gain": float(results["gain"])}, step=step)
            logger.save()  # the trainer has finished: nobody else writes the CSV's last rows
        if isinstance(logger, TensorBoardLogger) and png.is_file():
            logger.experiment.add_image("report", _rgb(png), step, dataformats="HWC")
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            if png.is_file():
                logger.log_image("report", [str(png)], step=step)
            run_dir_wandb = logger.experiment.dir
            logger.experiment.finish()
            if logger._offline:  # W&B's own hint is part of the output quiet=True hides
                log.info("W&B run saved offline; upload it with: wandb sync %s",
                         Path(run_dir_wandb).parent)
        elif isinstance(logger, MLFlowLogger):
            for name in ("report.png", "report.md", "eval.json", "config.yaml", "cost.json",
                         "judge_audit.json"):
                if (run_dir / name).is_file():
                    logger.experiment.log_artifact(logger.run_id, str(run_dir / name))


def _rgb(png: Path):
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def describe(loggers: list) -> str:
    """Where each logger writes, for the log line at start."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    parts = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            parts.append(f"csv {Path(logger.log_dir) / 'metrics.csv'}")
        elif isinstance(logger, TensorBoardLogger):
            parts.append(f"tensorboard {logger.log_dir}")
        elif isinstance(logger, WandbLogger):
            parts.append(f"wandb project {logger._project}"
                         + (" (offline)" if logger._offline else ""))
        elif isinstance(logger, MLFlowLogger):
            parts.append(f"mlflow experiment {logger._experiment_name} at {logger._tracking_uri}")
    return ", ".join(parts)


__all__ = ["PACKAGES", "csv_logger", "describe", "log_config", "log_results", "make_loggers",
           "mlflow_uri", "remember"]
