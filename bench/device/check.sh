#!/usr/bin/env bash
# The GPU check, in one call of a lent GPU machine (bench/README.md, "On a GPU"):
#   here:  bash bench/device/fetch-wheels.sh
#   there: run(command="bash bench/device/check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels beside the machine's own torch, runs the CUDA tests, then the
# benchmark on the GPU (raw vs segment, MONAI, time vs tissue). Everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/tileseg-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } \
  | tee "$OUT/machine.txt"
# Another torch/numpy there may deprecate what ours does not: ignore those warnings there.
timeout 180 python3 -m pytest -q -x -p no:cacheprovider -o addopts= \
  -W ignore::DeprecationWarning -W ignore::FutureWarning \
  tests/test_gpu.py tests/test_inference.py tests/test_stages.py 2>&1 | tee "$OUT/tests.log"
timeout "${BENCH_SECONDS:-300}" python3 bench/run.py --device cuda --size "${SIZE:-16384}" \
  --batch-size auto --skip-rss --tissue-size 8192 --out /tmp/bench 2>&1 | tee "$OUT/bench.log"
cp /tmp/bench/*.json "$OUT/" 2>/dev/null
