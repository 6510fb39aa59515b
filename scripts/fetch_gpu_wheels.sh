#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (it has torch, lightning, transformers, peft, torchvision),
# fetched here for its Python 3.12 into .whl/ (git-ignored); scripts/gpu_check.sh installs them.
# transformers is carried too: rdpo needs transformers 5 (mm_token_type_ids, 4-D masks as-is).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins() { grep -i "^$1==" constraints.txt; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in bitsandbytes omegaconf trl datasets dill multiprocess transformers \
            huggingface_hub torchmetrics; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$(pins "$name")"
done
du -sh .whl
