#!/usr/bin/env bash
# Creates (or reuses) .venv-eval: lmms-eval (rdpo's `eval` extra) for tests/test_handoff.py and
# the "After training" commands of docs/tools.md. Idempotent: a finished install leaves a stamp and the
# script exits at once.
#
#   scripts/eval_env.sh            # create or reuse; prints the venv's python
#   EVAL_VENV=DIR BASE_VENV=DIR scripts/eval_env.sh
#
# Why a venv of its own: lmms-eval 0.7.3 pins wandb==0.25.0 (the project pins 0.31.0), which
# drags protobuf 7 -> 6 and python-dateutil 4 -> 2.9 with it, and it needs filelock 3. torch,
# transformers, peft and the rest are the project's: .venv-eval is layered over the project venv
# (a .pth adds its site-packages after .venv-eval's own), so lmms-eval loads the exported model
# with exactly the transformers that trained it, and only lmms-eval and what it adds live here
# (about 1 GB; a few minutes the first time). Pins: constraints-eval.txt. In an environment of
# your own, `pip install -e ".[eval]"` installs the same (it downgrades wandb there).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE_VENV:-.venv}
VENV=${EVAL_VENV:-.venv-eval}
# The stamp names what was installed: the pins and pyproject's eval extra.
STAMP=$VENV/.rdpo-eval-$( (cat constraints-eval.txt; grep '^eval = ' pyproject.toml) | sha1sum | cut -c1-10)
if [[ -f $STAMP ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
if [[ ! -x $BASE/bin/python ]]; then
  echo "$BASE/bin/python: no project venv to layer lmms-eval over (run make venv first)" >&2
  exit 1
fi
[[ -x $VENV/bin/python ]] || "$BASE/bin/python" -m venv "$VENV"
purelib='import os, sysconfig; print(os.path.realpath(sysconfig.get_paths()["purelib"]))'
# addsitedir, not a bare path line, so the base's own .pth files run too; appended to sys.path,
# so a package installed here (wandb, protobuf, filelock) shadows the base's.
echo "import site; site.addsitedir('$("$BASE/bin/python" -c "$purelib")')" \
  > "$("$VENV/bin/python" -c "$purelib")/zz-rdpo-base-venv.pth"
# rdpo with its `eval` extra (lmms-eval, decord, filelock < 4: lmms-eval 0.7.3 patches
# filelock._api, which the project's filelock 4 no longer has); rdpo's own dependencies are
# the base venv's already.
"$VENV/bin/pip" install -q -c constraints-eval.txt -e ".[eval]" >&2
"$VENV/bin/python" -c "import lmms_eval, decord, rdpo, torch, transformers" >&2
touch "$STAMP"
echo "$VENV/bin/python"
