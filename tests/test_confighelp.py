"""The config reference: every schema key with type, default and docstring, in --help and in
docs/configuration.md."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rdpo.config import Config, JudgeConfig, PairsConfig
from rdpo.confighelp import (
    DOCS,
    DOCS_END,
    DOCS_START,
    add_options,
    docs_are_current,
    field_docs,
    main,
    reference,
    render_markdown,
    section_from_args,
    update_docs,
)
from rdpo.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[1]


def _schema_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _schema_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


SCHEMA_KEYS = list(_schema_keys(OmegaConf.to_container(OmegaConf.structured(Config))))


def test_field_docs_reads_the_literal_after_each_field():
    source = '''
class A:
    x: int = 1
    """First line
    continues here."""
    y: str = "a"
    z: float = 0.5
    """Zed."""
'''
    assert field_docs(source) == {("A", "x"): "First line continues here.", ("A", "z"): "Zed."}


def test_every_schema_key_is_listed_once_and_documented():
    keys = [k for s in reference() for k in s.keys]
    assert [k.name for k in keys] == SCHEMA_KEYS
    undocumented = [k.name for k in keys if not k.doc]
    assert not undocumented, f"schema fields without a docstring: {undocumented}"
    assert [s.name for s in reference()] == list(OmegaConf.structured(Config).keys())


def test_types_and_defaults():
    keys = {k.name: k for s in reference() for k in s.keys}
    assert (keys["dpo.beta"].type, keys["dpo.beta"].default) == ("float", "0.1")
    assert (keys["run.dir"].type, keys["run.dir"].default) == ("str", "??? (required)")
    assert (keys["data.heldout_pool"].type, keys["data.heldout_pool"].default) == ("str | None", "null")
    assert (keys["toy.enabled"].type, keys["toy.enabled"].default) == ("bool", "false")
    assert keys["model.lora.r"].default == "16" and keys["model.lora.r"].doc == "LoRA rank."
    assert keys["run.report"].default == "true"
    # a docstring spanning lines comes out as one paragraph
    assert keys["toy.enabled"].doc.startswith("Build (first run) or reuse") and "\n" not in keys["toy.enabled"].doc


def test_fit_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    keys = {k.name: k for s in reference() for k in s.keys}
    for name, key in keys.items():
        allowed = f"  ({key.allowed})" if key.allowed else ""
        assert f"  {name}: {key.type} = {key.default}{allowed}\n" in out, name
    assert "dpo.beta: float = 0.1  (> 0)\n      KL strength β of the DPO objective." in out
    assert "  dpo.loss_type: str = sigmoid  (one of sigmoid, robust, hinge, ipo)\n" in out
    assert "  dpo.label_smoothing: float = 0.0  (in [0, 0.5))\n" in out
    assert "  run.seed: int = 0\n" in out


def test_fit_help_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "rdpo.fit", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(f"  {key}: " in proc.stdout for key in SCHEMA_KEYS)


def test_docs_reference_is_current():
    assert DOCS == "docs/configuration.md"
    assert docs_are_current(ROOT / DOCS), (
        f"{DOCS}'s configuration reference is stale: run python -m rdpo.confighelp --update-docs")


def _stale_page(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# x\n\nintro\n{DOCS_START}\n| stale | table |\n{DOCS_END}\n\nafter\n")
    return path


def test_update_and_check_docs(tmp_path, capsys):
    page = _stale_page(tmp_path / "configuration.md")
    assert not docs_are_current(page)
    assert main(["--check-docs", str(page)]) == 1
    assert "stale" in capsys.readouterr().err
    assert update_docs(page) is True
    text = page.read_text()
    assert text.startswith("# x\n\nintro\n") and text.endswith(f"{DOCS_END}\n\nafter\n")
    assert render_markdown() in text and "| stale |" not in text
    assert main(["--check-docs", str(page)]) == 0
    assert update_docs(page) is False  # idempotent


def test_cli_default_is_docs_configuration_and_old_names_still_work(tmp_path, monkeypatch, capsys):
    """`--update-docs` with no file rewrites docs/configuration.md (relative to the working
    directory, the repository root); `--update-readme` / `--check-readme` are the same options."""
    monkeypatch.chdir(tmp_path)
    page = _stale_page(tmp_path / "docs" / "configuration.md")
    assert main(["--check-readme"]) == 1
    assert main(["--update-docs"]) == 0
    assert "docs/configuration.md: updated" in capsys.readouterr().out
    assert docs_are_current(page) and main(["--check-docs"]) == 0
    _stale_page(page)
    assert main(["--update-readme", str(page)]) == 0 and docs_are_current(page)


def test_page_without_markers_is_a_clear_error(tmp_path):
    page = tmp_path / "configuration.md"
    page.write_text("# no markers\n")
    with pytest.raises(ValueError, match="configuration.md: no config reference markers"):
        docs_are_current(page)


def test_markdown_escapes_pipes():
    md = render_markdown()
    row = next(line for line in md.splitlines() if line.startswith("| `judge.model`"))
    # the type holds '|': escaped, so the row still has exactly five cells (allowed empty)
    assert "`str \\| None`" in row
    assert len(row.replace("\\|", "").strip("|").split("|")) == 5
    beta = next(line for line in md.splitlines() if line.startswith("| `dpo.beta`"))
    assert beta.startswith("| `dpo.beta` | `float` | `0.1` | `> 0` | KL strength")


def _judge_parser(defaults=None):
    import argparse

    names = ("kind", "model", "base_url", "concurrency", "timeout", "max_tokens", "cache")
    parser = argparse.ArgumentParser()
    add_options(parser, JudgeConfig, names, defaults)
    add_options(parser, PairsConfig, ("aggregation",))
    return parser, names


def test_cli_options_come_from_the_schema():
    """Names, types, defaults, choices and help of `rdpo.tools.evaluate judge` / `rdpo.tools.rubrics build`
    options are the JudgeConfig fields'."""
    parser, names = _judge_parser({"kind": "openai", "cache": None})
    args = parser.parse_args([])
    assert (args.kind, args.cache, args.aggregation) == ("openai", None, "lexicographic")
    assert (args.concurrency, args.timeout, args.max_tokens) == (JudgeConfig.concurrency,
                                                                JudgeConfig.timeout,
                                                                JudgeConfig.max_tokens)
    args = parser.parse_args(["--base-url", "http://x/v1", "--concurrency", "3", "--timeout", "2"])
    assert (args.base_url, args.concurrency, args.timeout) == ("http://x/v1", 3, 2.0)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["concurrency"] == "openai: requests in flight at once. (> 0, default: 8)"
    assert helps["cache"].endswith("(default: none)")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "nope"])


def test_section_from_args_checks_by_option_name():
    parser, names = _judge_parser({"kind": "openai", "cache": None})
    cfg, problems = section_from_args(JudgeConfig, parser.parse_args(
        ["--model", "m", "--concurrency", "0"]), names, {"cache": None})
    assert isinstance(cfg, JudgeConfig) and cfg.model == "m" and cfg.cache is None
    assert problems == ["--concurrency: must be > 0, got 0",
                        "--base-url: an openai judge needs the server's URL, e.g. "
                        "http://localhost:8000/v1"]
    cfg, problems = section_from_args(JudgeConfig, parser.parse_args(
        ["--model", "m", "--base-url", "http://x/v1"]), names)
    assert problems == [] and cfg.max_retries == JudgeConfig.max_retries  # not an option here
