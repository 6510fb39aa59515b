"""`python -m rdpo` lists the commands; every command line runs as it did before the tools moved."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from rdpo.__main__ import COMMANDS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_the_table_names_every_command_and_its_module_exists():
    out = _run("rdpo")
    assert out.returncode == 0
    for name, (module, _) in COMMANDS.items():
        assert f"  {name}  " in out.stdout or f"  {name} " in out.stdout, name
        assert importlib.util.find_spec(module) is not None, module


def test_an_unknown_command_is_refused_with_the_table():
    out = _run("rdpo", "trian")
    assert out.returncode == 2 and "no command 'trian'" in out.stderr and "fit" in out.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_both_command_lines_reach_the_same_parser(name):
    """``python -m rdpo.NAME --help`` (scripts, sbatch files) and ``python -m rdpo NAME --help``
    print the same usage, the command's own."""
    old, new = _run(f"rdpo.{name}", "--help"), _run("rdpo", name, "--help")
    assert old.returncode == 0 and new.returncode == 0, (old.stderr[-800:], new.stderr[-800:])
    assert old.stdout.startswith("usage: python -m rdpo.") and old.stdout == new.stdout
