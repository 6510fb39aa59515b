"""The top-level callbacks/ folder ships as `rdpo.callbacks`, in an editable install and a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_callbacks():
    import rdpo.callbacks
    from rdpo.callbacks import RubricScoringCallback

    assert Path(rdpo.callbacks.__file__).resolve() == ROOT / "callbacks" / "__init__.py"
    assert RubricScoringCallback.__module__ == "rdpo.callbacks.round"


@pytest.mark.slow  # builds and installs a wheel with pip in subprocesses
def test_wheel_installs_callbacks(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("rdpo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rdpo/callbacks/__init__.py" in names and "rdpo/callbacks/round.py" in names
    assert not any(n.startswith("callbacks/") for n in names)
    # every module of the source tree ships (a subpackage missing from pyproject's list would not)
    source = {f"rdpo/{p.relative_to(ROOT / 'rdpo').as_posix()}" for p in (ROOT / "rdpo").rglob("*.py")}
    assert source <= set(names), sorted(source - set(names))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    # A fresh interpreter, run away from the checkout, with the installed wheel first on the
    # path: the import must resolve inside the wheel's files, not the editable checkout.
    out = subprocess.run(
        [sys.executable, "-c",
         "import rdpo.callbacks as c; from rdpo.callbacks import RubricScoringCallback; "
         "print(c.__file__)"],
        cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (site / "rdpo" / "callbacks" / "__init__.py").resolve()
