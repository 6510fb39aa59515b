"""A judge named on the command line: `JudgeConfig` fields as options (``--kind``, or prefixed
per judge, ``--a.base-url``), a YAML file (a judge section, or a run's config.yaml), or both.

Shared by `python -m rdpo.evaluate` (judge, agreement) and `python -m rdpo.rubrics audit`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rdpo.config import JudgeConfig

JUDGE_OPTIONS = ("kind", "model", "base_url", "api_key_env", "concurrency", "timeout",
                 "max_retries", "max_tokens", "batch_size", "parse_retries", "cache")
"""The `JudgeConfig` fields `evaluate judge` takes as options."""
JUDGE_DEFAULTS = {"kind": "openai", "cache": None}
"""Where this CLI's defaults differ from a training run's: a model judge, and no cache file
unless asked for (a run keeps it in run.dir)."""
SPEC_OPTIONS = (*JUDGE_OPTIONS, "noise")
"""The `JudgeConfig` fields a named judge takes (``--a.kind``, ``--b.base-url``, ...); ``noise``
simulates a rule judge that errs (`rdpo.demo.simjudges`)."""


def split_judge_options(argv: Sequence[str], names: Sequence[str]
                        ) -> tuple[list[str], dict[str, list[str]]]:
    """(`argv` without the ``--NAME.OPTION VALUE`` / ``--NAME.OPTION=VALUE`` tokens of each
    judge of `names`, those tokens per judge as plain ``--OPTION VALUE``)."""
    rest, tokens = [], {j: [] for j in names}
    argv, i = list(argv), 0
    while i < len(argv):
        tok = argv[i]
        judge = next((j for j in names if tok.startswith(f"--{j}.")), None)
        if judge is None:
            rest.append(tok)
            i += 1
            continue
        name, eq, value = tok[len(judge) + 3:].partition("=")
        tokens[judge].append(f"--{name}")
        if eq:
            tokens[judge].append(value)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            tokens[judge].append(argv[i + 1])
            i += 1
        i += 1
    return rest, tokens


def judge_config(name: str, path: str | None, tokens: Sequence[str]
                 ) -> tuple[JudgeConfig, int | None]:
    """Judge `name`'s `JudgeConfig`: `evaluate judge`'s defaults, then the YAML at `path` (its
    ``judge`` section when it has one: a run's config.yaml works), then the ``--NAME.OPTION``
    tokens; and the YAML's ``run.seed`` if any. `ConfigError` lists every problem, each named
    by its option or file."""
    from omegaconf import OmegaConf

    from rdpo.config import ConfigError, check
    from rdpo.confighelp import add_options, option
    from rdpo.settings import merge_errors

    base = OmegaConf.structured(JudgeConfig(**JUDGE_DEFAULTS))
    sources, seed, problems = [], None, []
    if path:
        if not Path(path).is_file():
            raise ConfigError([f"--{name}: no such file: {path}"])
        raw = OmegaConf.load(path)
        section = raw.judge if OmegaConf.is_dict(raw) and "judge" in raw else raw
        if not OmegaConf.is_dict(section):
            raise ConfigError([f"--{name} {path}: expected a mapping of judge settings"])
        sources.append((path, section))
        seed = OmegaConf.select(raw, "run.seed", default=None)
    parser = argparse.ArgumentParser(prog=f"--{name}.", add_help=False, allow_abbrev=False)
    add_options(parser, JudgeConfig, SPEC_OPTIONS)
    given, unknown = parser.parse_known_args(list(tokens))
    problems += [f"--{name}.{u.lstrip('-')}: unknown judge option (options: "
                 f"{', '.join(option(o)[2:] for o in SPEC_OPTIONS)})"
                 for u in unknown if u.startswith("--")]
    named = {o for o in SPEC_OPTIONS if option(o) in tokens}
    sources.append((f"--{name}.OPTION", OmegaConf.create({o: getattr(given, o) for o in named})))
    problems += merge_errors(base, sources)  # a bad value is reported and left unmerged
    cfg = OmegaConf.to_object(base)
    problems += check(cfg, lambda k: f"--{name}.{k.replace('_', '-')}")
    if problems:
        raise ConfigError(problems)
    return cfg, seed


def build_judge(cfg: JudgeConfig, seed: int = 0):
    """The judge of `cfg` asked for per-criterion verdicts: a rule judge simulates errors
    (``noise``) like the toy's (`rdpo.demo.simjudges.make_simulated`), seeded by `seed`."""
    if cfg.kind == "rule":
        from rdpo.demo.simjudges import make_simulated

        return make_simulated(cfg, None, seed, "rubric")
    from rdpo.judging.judges import make_judge

    return make_judge(cfg, "rubric")
