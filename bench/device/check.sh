#!/usr/bin/env bash
# The GPU check, in one call of a lent GPU machine (bench/README.md, "On a GPU"):
#   here:  bash bench/device/fetch-wheels.sh
#   there: run(command="bash bench/device/check.sh", carry=[".whl"], timeout_s=480)
# Installs the carried wheels beside the machine's own torch, runs the CUDA tests, then the
# benchmark on the GPU (raw vs segment, the pipeline's own ceiling, MONAI, time vs tissue),
# then the bare forward by layout and batch-norm folding (bench/forward.py).
# Everything lands in $OUT, the benchmark's JSON every few seconds, so a run cut off at its
# limit still brings back what finished. A dry run of the script itself, here, on the CPU and
# small images:
#   SKIP_INSTALL=1 PYTHON=.venv/bin/python DEVICE=cpu SIZE=1024 TISSUE_SIZE=1024 \
#     MONAI_SIZE=1024 FORWARD_TILE=256 bash bench/device/check.sh
set -uo pipefail
OUT=${OUT:-/tmp/tileseg-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BENCH=/tmp/tileseg-bench
mkdir -p "$OUT" "$BENCH"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
fi
# What the machine is and whether everything imports: written first, whatever comes after.
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
  "$PY" -V; command -v cc gcc || echo "no C compiler (torch.compile needs one)"
  "$PY" -c "
import dask, distributed, imagecodecs, numpy, scipy, skimage, tifffile, torch, yaml, zarr
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())
print('numpy', numpy.__version__, 'zarr', zarr.__version__, 'dask', dask.__version__)
import pipeline.engine.driver, monai; print('tileseg and monai import')"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
(while sleep 5; do cp "$BENCH"/*.json "$OUT/" 2>/dev/null; done) &
saver=$!
trap 'kill $saver 2>/dev/null; cp "$BENCH"/*.json "$OUT/" 2>/dev/null' EXIT
# Another torch/numpy there may deprecate what ours does not: ignore those warnings there.
# No -x: a failing compiled test must not hide the bf16 and batch-size ones.
timeout "${TEST_SECONDS:-150}" "$PY" -m pytest -q -rA -p no:cacheprovider -o addopts= \
  -W ignore::DeprecationWarning -W ignore::FutureWarning \
  tests/models/test_gpu.py tests/models/test_inference.py tests/engine/test_stages.py > "$OUT/tests.log" 2>&1
echo "tests: exit $? (tests.log)"; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" \
  "$OUT/tests.log" | tail -25
timeout "${BENCH_SECONDS:-240}" "$PY" bench/run.py --device "$DEVICE" --size "${SIZE:-16384}" \
  --batch-size auto --repeats "${REPEATS:-1}" --skip-rss --tissue-size "${TISSUE_SIZE:-8192}" \
  --monai-size "${MONAI_SIZE:-4096}" --out "$BENCH" > "$OUT/bench.log" 2>&1
echo "bench: exit $? (bench.log)"; tail -40 "$OUT/bench.log"
# Last, so that running out of time cuts off only this: the bare forward by layout and folding.
timeout "${FORWARD_SECONDS:-40}" "$PY" bench/forward.py --device "$DEVICE" \
  --batch-size "${FORWARD_BATCH:-8}" ${FORWARD_TILE:+--tile "$FORWARD_TILE"} > "$OUT/forward.log" 2>&1
echo "forward: exit $? (forward.log)"; tail -7 "$OUT/forward.log"
