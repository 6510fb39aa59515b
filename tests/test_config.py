"""Typed config: every shipped YAML validates, and every problem is reported at once."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rdpo.config import (
    Config,
    ConfigError,
    DPOConfig,
    JudgeConfig,
    ModelConfig,
    PairsConfig,
    ToyConfig,
    allowed,
    check,
    choices,
    load_config,
)

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
REQUIRED = ["run.dir=runs/x", "model.path=/m", "data.train_pool=/p.jsonl"]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path, tmp_path):
    # the toy cache goes to tmp, so a toy config fills its paths there (nothing is built)
    cfg = load_config(path, [f"toy.cache_dir={tmp_path}"])
    assert isinstance(cfg, Config)
    assert cfg.run.dir and cfg.model.path and cfg.data.train_pool
    assert list(tmp_path.iterdir()) == []


def test_defaults_with_required_values():
    cfg = load_config(None, REQUIRED)
    assert cfg.run.dir == "runs/x"
    assert cfg.dpo.beta == 0.1 and cfg.dpo.loss_type == "sigmoid"
    assert cfg.data.heldout_pool is None


def test_all_problems_in_one_error(tmp_path):
    path = write(tmp_path, """
run:
  dir: runs/x
  colour: blue
model:
  path: /m
data:
  train_pool: /p.jsonl
  batch_size: eight
dpo:
  loss_type: kto
""")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["rollout.nonsense=3"])
    message = str(err.value)
    for key in ("run.colour", "data.batch_size", "dpo.loss_type", "rollout.nonsense"):
        assert key in message, key
    assert len(err.value.problems) == 4
    assert "unknown key" in next(p for p in err.value.problems if p.startswith("run.colour"))
    assert "command line" in next(p for p in err.value.problems if p.startswith("rollout.nonsense"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dpo.beta=0", "dpo.beta"),
        ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
        ("model.dtype=float64", "model.dtype"),
        ("toy.family=llava", "toy.family"),
        ("dpo.lr=abc", "dpo.lr"),
    ],
)
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*REQUIRED, override])
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems


def test_missing_run_dir_reported(tmp_path):
    path = write(tmp_path, "model:\n  path: /m\ndata:\n  train_pool: /p.jsonl\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["run.dir: missing required value"]


def test_missing_required_values_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config(None, [])
    message = str(err.value)
    for key in ("run.dir", "model.path", "data.train_pool"):
        assert key in message


def test_overrides_apply_with_types(tmp_path):
    path = write(tmp_path, "run:\n  dir: runs/x\nmodel:\n  path: /m\ndata:\n  train_pool: /p\n"
                           "dpo:\n  beta: 0.2\n")
    cfg = load_config(path, ["dpo.beta=0.5", "data.batch_size=3", "run.progress_bar=false",
                             "dpo.loss_type=ipo", "model.lora.r=4"])
    assert cfg.dpo.beta == 0.5 and isinstance(cfg.dpo.beta, float)
    assert cfg.data.batch_size == 3 and isinstance(cfg.data.batch_size, int)
    assert cfg.run.progress_bar is False
    assert cfg.dpo.loss_type == "ipo"
    assert cfg.model.lora.r == 4
    # the YAML beats the defaults, the command line beats the YAML
    assert load_config(path).dpo.beta == 0.2


def test_int_given_to_float_field_becomes_float():
    cfg = load_config(None, [*REQUIRED, "dpo.beta=1"])
    assert cfg.dpo.beta == 1.0 and isinstance(cfg.dpo.beta, float)


def test_toy_fills_paths_under_cache_dir(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config(None, ["run.dir=runs/x", "toy.enabled=true", f"toy.cache_dir={cache}"])
    root = cache.resolve()
    for value in (cfg.model.path, cfg.data.train_pool, cfg.data.heldout_pool):
        assert Path(value).is_relative_to(root), value
    assert Path(cfg.data.train_pool).name == "train.jsonl"
    assert Path(cfg.data.heldout_pool).name == "heldout.jsonl"
    assert not cache.exists()  # paths only; building happens at run time


def test_toy_keeps_explicit_paths(tmp_path):
    cfg = load_config(None, ["run.dir=runs/x", "toy.enabled=true", f"toy.cache_dir={tmp_path}",
                             "model.path=/my/model"])
    assert cfg.model.path == "/my/model"
    assert Path(cfg.data.train_pool).is_relative_to(tmp_path.resolve())


def test_toy_paths_depend_on_settings(tmp_path):
    base = ["run.dir=runs/x", "toy.enabled=true", f"toy.cache_dir={tmp_path}"]
    a = load_config(None, base)
    b = load_config(None, [*base, "toy.n_train=10"])
    c = load_config(None, [*base, "toy.hidden_size=32"])
    assert a.data.train_pool != b.data.train_pool
    assert a.model.path != c.model.path and a.data.train_pool == c.data.train_pool


def test_override_without_equals_errors():
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(None, [*REQUIRED, "dpo.beta"])


def test_missing_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


# -- each setting written once, beside its field --------------------------------------------

def _constrained():
    """(dotted key, field) of every schema field that says what it allows."""
    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                yield from walk(f.default_factory, f"{prefix}{f.name}.")
            elif f.metadata:
                yield f"{prefix}{f.name}", f
    return list(walk(Config, ""))


def _bad_value(f):
    meta = f.metadata
    if "choices" in meta:
        return -1 if isinstance(meta["choices"][0], int) else "not-a-choice"
    if "ge" in meta or "gt" in meta:
        return meta.get("ge", meta.get("gt")) - 1
    return meta.get("le", meta.get("lt")) + 1


@pytest.mark.parametrize(("key", "f"), _constrained(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_constraint_is_checked_and_named(key, f):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*REQUIRED, f"{key}={_bad_value(f)}"])
    [problem] = err.value.problems
    assert problem.startswith(f"{key}: ") and allowed(f.metadata) in problem


def test_range_messages():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*REQUIRED, "dpo.beta=0", "dpo.label_smoothing=0.5", "rollout.top_p=0",
                           "judge.max_retries=-1", "dpo.loss_type=kto"])
    assert sorted(err.value.problems) == sorted([
        "dpo.beta: must be > 0, got 0.0", "dpo.label_smoothing: must be in [0, 0.5), got 0.5",
        "rollout.top_p: must be in (0, 1], got 0.0", "judge.max_retries: must be >= 0, got -1",
        "dpo.loss_type: 'kto' is not one of sigmoid, robust, hinge, ipo"])


def test_choices_match_the_modules_that_dispatch_on_them():
    from rdpo.demo.tiny import FAMILIES
    from rdpo.engine.loss import LOSSES
    from rdpo.judging.judges import JUDGES
    from rdpo.judging.scoring import AGGREGATIONS
    from rdpo.model import DTYPES
    from rdpo.rounds import REFERENCES

    assert set(choices(DPOConfig, "loss_type")) == set(LOSSES)
    assert set(choices(DPOConfig, "reference")) == set(REFERENCES)
    assert set(choices(ModelConfig, "dtype")) == set(DTYPES)
    assert set(choices(ToyConfig, "family")) == set(FAMILIES)
    assert choices(PairsConfig, "aggregation") == tuple(AGGREGATIONS)
    assert set(choices(JudgeConfig, "kind")) == set(JUDGES)


def test_defaults_are_readable_from_the_class():
    """Code that needs a default refers to the field (PairsConfig.strategy), never restates it."""
    assert PairsConfig.strategy == "rubric" and JudgeConfig.max_tokens == 1024
    assert JudgeConfig().timeout == 60.0


def test_backends_restate_no_judge_setting():
    """The chat backends take the judge settings without defaults: only JudgeConfig has them."""
    import inspect

    from rdpo.judging.chat import OpenAIChat, TransformersChat

    settings = {f.name for f in dataclasses.fields(JudgeConfig)} | {"max_new_tokens"}
    for cls in (OpenAIChat, TransformersChat):
        for p in inspect.signature(cls).parameters.values():
            if p.name in settings:
                assert p.default is inspect.Parameter.empty, f"{cls.__name__}({p.name}=...)"


@pytest.mark.parametrize(("strategy", "fix"), [
    ("deepspeed_stage_2", "use run.strategy=deepspeed run.deepspeed_stage=2"),
    ("deepspeed_stage_3_offload",
     "use run.strategy=deepspeed run.deepspeed_stage=3 run.deepspeed_offload=true"),
    ("deepspeed_custom", "use run.strategy=deepspeed"),
])
def test_lightning_deepspeed_names_are_refused(strategy, fix):
    """One source of DeepSpeed settings: run.strategy=deepspeed + run.deepspeed_stage/_offload."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [*REQUIRED, f"run.strategy={strategy}"])
    [problem] = err.value.problems
    assert problem.startswith(f"run.strategy: {strategy!r}") and problem.endswith(fix)
    for ok in ("deepspeed", "ddp", "auto", "fsdp"):
        assert load_config(None, [*REQUIRED, f"run.strategy={ok}"]).run.strategy == ok


def test_check_works_on_sections_and_cli_names():
    from rdpo.confighelp import option

    judge = JudgeConfig(kind="openai", concurrency=0)
    assert check(judge, option) == ["--concurrency: must be > 0, got 0",
                                    "--model: an openai judge needs a model (the served model name)",
                                    "--base-url: an openai judge needs the server's URL, e.g. "
                                    "http://localhost:8000/v1"]
    assert check(JudgeConfig(), "judge.{}".format) == []
    assert check(ModelConfig(), "model.{}".format) == ["model.path: missing required value"]


def test_config_imports_light_and_no_cycle():
    """rdpo.config imports neither torch, Lightning nor rdpo.demo.warmstart (the toy's builder imports
    the config, not the other way round at import time)."""
    code = ("import sys, rdpo.config, rdpo.confighelp, rdpo.preflight\n"
            "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'transformers'}\n"
            "assert not heavy, heavy\n"
            "del sys.modules['rdpo.config']\n"
            "import rdpo.demo.warmstart as w, importlib; importlib.reload(w)\n"
            "assert 'rdpo.config' not in sys.modules, 'warmstart imports rdpo.config'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
