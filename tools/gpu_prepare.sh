#!/usr/bin/env bash
# Prepares, on a development machine (no GPU needed), what the GPU check carries to a lent
# device machine: the folder .gpu/ (ignored by git) with
#   .gpu/sdserve.gz     sdserve built with --features cuda (kernels for CUDA_COMPUTE_CAP,
#                       default 90 = H100/H200), stripped (62 MB) and gzipped (18 MB): what
#                       travels is limited to 64 MiB, the tracked tree included
#   .gpu/whl/*.whl      Python wheels the device image lacks (diffusers and its one missing
#                       dependency), for Python 3.12
# The device machine has no Rust toolchain and no network, hence the prebuilt binary.
# Then, from the checkout the session was started in, call the device tool's `run` with
#   carry [".gpu"], command "bash tools/gpu_check.sh", timeout_s 560
# (see BENCHMARKS.md, "GPU: how to measure when a device is lent").
#
# Usage: bash tools/gpu_prepare.sh [cargo profile: dev (default) | release]
# The dev profile already builds every dependency at opt-level 3 (Cargo.toml), and on
# the GPU the work is in candle's CUDA kernels and cuBLAS, so a debug-profile binary times
# the same as a release one within noise; the release profile costs a long build on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-dev}
CUDA_ROOT_DIR=${CUDA_ROOT_DIR:-/work/cuda-13.0}

if [ ! -f "$CUDA_ROOT_DIR/env.sh" ]; then
    cargo fetch
    bash tools/cuda_toolkit_from_pypi.sh "$CUDA_ROOT_DIR"
fi
# shellcheck disable=SC1091
source "$CUDA_ROOT_DIR/env.sh"

cargo build --profile "$PROFILE" --features cuda --bin sdserve
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PROFILE_DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
mkdir -p .gpu/whl
cp "$TARGET_DIR/$PROFILE_DIR/sdserve" .gpu/sdserve
strip .gpu/sdserve
gzip -f .gpu/sdserve

# diffusers is pure Python; of its requirements only importlib_metadata is missing from
# the device image (KINDS.md lists the image's packages).
PIP=${PIP:-python3 -m pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .gpu/whl \
    diffusers==0.42.1 importlib_metadata==8.7.0

du -sh .gpu/sdserve.gz .gpu/whl
echo "ready: carry .gpu and run 'bash tools/gpu_check.sh' on the device machine"
