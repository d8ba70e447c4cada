#!/usr/bin/env bash
# Download, here, the wheels a GPU machine lacks (its image has torch, numpy, scikit-image,
# tifffile, pyarrow, safetensors, pytest, hypothesis ... but no zarr, dask or imagecodecs):
# Python 3.12, x86_64, the versions of constraints.txt. They land in .whl/ (git-ignored through
# .git/info/exclude) and travel with `run(carry=[".whl"])`; bench/device/check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
pin() { grep -i -m1 "^$1==" constraints.txt; }
packages=(zarr numcodecs donfig google-crc32c dask distributed partd locket tornado tblib zict
          imagecodecs ome-zarr monai Deprecated)
specs=()
for p in "${packages[@]}"; do specs+=("$(pin "$p")"); done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "${specs[@]}"
du -sh .whl
