"""run.loggers: each logger gets the config, the metrics and the report, read back with the
logger's own reader (TensorBoard's EventAccumulator, MLflow's client, W&B's offline files).
No network: W&B offline, MLflow on a sqlite file."""

from __future__ import annotations

import json

import pytest
from small_toy import QUICKSTART

from rdpo.config import ConfigError, load_config
from rdpo.loggers import describe, log_config, log_results, make_loggers, mlflow_uri, remember


def _cfg(tmp_path, *extra):
    return load_config(QUICKSTART, [f"run.dir={tmp_path / 'run'}", *extra])


def _report(run_dir):
    """A finished run's files that log_results sends on: report.png/.md, eval.json."""
    from PIL import Image

    run_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(run_dir / "report.png")
    (run_dir / "report.md").write_text("# report\n")
    (run_dir / "eval.json").write_text(json.dumps({"gain": 0.25}))
    (run_dir / "config.yaml").write_text("run: {}\n")


def test_loggers_are_checked_with_the_config(tmp_path):
    assert _cfg(tmp_path).run.loggers == ["csv"]
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, "run.loggers=[csv,tb,csv]")
    assert err.value.problems == [
        "run.loggers: 'tb' is not one of csv, tensorboard, wandb, mlflow",
        "run.loggers: 'csv' is listed twice"]
    assert make_loggers([], _cfg(tmp_path).logger, tmp_path) == []


def test_tensorboard_gets_config_metrics_and_report_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "run.loggers=[csv,tensorboard]")
    run_dir = tmp_path / "run"
    loggers = make_loggers(cfg.run.loggers, cfg.logger, run_dir)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger"]
    assert describe(loggers) == (f"csv {run_dir}/logs/metrics.csv, "
                                 f"tensorboard {run_dir}/tensorboard/")
    log_config(loggers, cfg)
    for step, score in ((0, 0.4), (40, 0.6)):
        for lg in loggers:
            lg.log_metrics({"round/mean_score": score, "round/dropped/small_margin": 3.0}, step)
    _report(run_dir)
    for lg in loggers:
        lg.save()  # as the trainer does
    log_results(loggers, run_dir, {"gain": 0.25}, step=40)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("round/mean_score")] == [
        (0, 0.4), (40, 0.6)]
    assert [e.value for e in events.Scalars("heldout/gain")] == [0.25]
    assert [e.value for e in events.Scalars("round/dropped/small_margin")] == [3.0, 3.0]
    (image,) = events.Images("report")
    assert (image.width, image.height, image.step) == (40, 20, 40)
    hparams = (run_dir / "tensorboard" / "hparams.yaml").read_text()
    assert "beta: 0.5" in hparams and "max_steps: 400" in hparams
    csv = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert csv[0].split(",") == ["heldout/gain", "round/dropped/small_margin", "round/mean_score",
                                 "step"]
    assert "max_steps: 400" in (run_dir / "logs" / "hparams.yaml").read_text()


def test_mlflow_gets_params_metrics_and_artifacts(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tmp_path, "run.loggers=[mlflow]", f"logger.mlflow.tracking_uri={uri}",
               f"logger.mlflow.artifact_location={tmp_path}/artifacts")
    assert mlflow_uri(cfg.logger.mlflow) == uri
    run_dir = tmp_path / "run"
    (logger,) = make_loggers(cfg.run.loggers, cfg.logger, run_dir)
    log_config([logger], cfg)
    logger.log_metrics({"round/mean_score": 0.5}, step=0)
    _report(run_dir)
    log_results([logger], run_dir, {"gain": 0.25}, step=40)
    logger.finalize("success")
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "run"
    assert run.data.params["dpo/beta"] == "0.5" and run.data.params["run/loggers"] == "['mlflow']"
    assert run.data.metrics == {"round/mean_score": 0.5, "heldout/gain": 0.25}
    assert sorted(a.path for a in client.list_artifacts(logger.run_id)) == [
        "config.yaml", "eval.json", "report.md", "report.png"]
    # A resumed run continues the same MLflow run; a new start makes a new one.
    remember([logger], run_dir)
    (again,) = make_loggers(cfg.run.loggers, cfg.logger, run_dir, resume=True)
    again.log_metrics({"round/mean_score": 0.75}, step=80)
    assert again.run_id == logger.run_id
    history = client.get_metric_history(logger.run_id, "round/mean_score")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (80, 0.75)]
    (fresh,) = make_loggers(cfg.run.loggers, cfg.logger, run_dir)
    fresh.log_metrics({"round/mean_score": 0.1}, step=0)
    assert fresh.run_id != logger.run_id


def test_wandb_offline_gets_config_metrics_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, "run.loggers=[wandb]", "logger.wandb.offline=true",
               "logger.wandb.tags=[toy]")
    run_dir = tmp_path / "run"
    (logger,) = make_loggers(cfg.run.loggers, cfg.logger, run_dir)
    assert describe([logger]) == "wandb project rdpo (offline)"
    log_config([logger], cfg)
    logger.log_metrics({"round/mean_score": 0.5}, step=0)
    run = logger.experiment
    assert run.config["dpo"]["beta"] == 0.5 and run.config["run"]["loggers"] == ["wandb"]
    assert run.tags == ("toy",) and run.name == "run"
    assert run.summary["round/mean_score"] == 0.5
    _report(run_dir)
    log_results([logger], run_dir, {"gain": 0.25}, step=40)  # finishes the W&B run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))  # the transaction log `wandb sync` uploads
    (image,) = (offline / "files" / "media" / "images").glob("report_*.png")
    assert image.read_bytes() == (run_dir / "report.png").read_bytes()
    remember([logger], run_dir)
    (again,) = make_loggers(cfg.run.loggers, cfg.logger, run_dir, resume=True)
    assert again.experiment.id == run.id  # a resumed run logs to the same W&B run
    again.experiment.finish()
