#!/usr/bin/env bash
# GPU checks in one call on a lent GPU machine (see the device tool's README):
#   scripts/fetch_gpu_wheels.sh              # here, once: wheels the GPU image lacks -> .whl/
#   device run: bash scripts/gpu_check.sh    # carry: [".whl"]; writes $OUT/gpu_tests.log, $OUT/bench.json
# Runs the GPU-marked tests (QLoRA 4-bit on CUDA, bf16, packed pairs; DeepSpeed ZeRO-2/3 x
# LoRA/QLoRA on one GPU, tests/test_gpu.py, when deepspeed is present: the toy is built once,
# then four short runs), and the DPO benchmark against TRL at a 2B-class shape in bf16.
# Budget: about 9.5 minutes (tests ≤ 200 s, the benchmark's 5 settings ≤ 370 s): device.run's
# timeout_s 590.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
# rdpo itself, with rdpo.callbacks mapped from callbacks/ (as the installed package has it).
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/rdpo_site . || exit 1
export PYTHONPATH=/tmp/rdpo_site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"

timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 370 python3 -m rdpo.bench dpo --json --shape 2b --device cuda --precision bf16 \
  --steps 8 --batch 4 --repeats 1 --work /tmp/bench2b 2>"$OUT/bench.err" | tee "$OUT/bench.json"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
