#!/usr/bin/env bash
# Prepare, on this machine (which reaches PyPI), the Python packages that the GPU machine of the
# device tool lacks, as pieces small enough for its 64 MiB-per-call carry limit. Then follow the
# device calls described at the top of bench/gpu_check.sh.
#
#   bash bench/prepare_gpu_wheels.sh            # DALI for CUDA 13 and its runtime needs (~55 MiB x 3)
#   FAISS=1 bash bench/prepare_gpu_wheels.sh    # + faiss GPU with the CUDA 12 cuBLAS/cuRAND it needs
#                                               #   (~785 MB of wheels more: about 10 extra device calls)
#
# The GPU machine runs Python 3.12 with torch 2.11+cu130, Triton 3.6 and the CUDA 13 libraries that
# torch needs (KINDS.md), but neither NVIDIA DALI nor nvJPEG nor faiss. This script
#   1. downloads the wheels for CPython 3.12 / manylinux x86_64 into .whl/wheels/ (a cache),
#   2. installs them (no dependencies) into a staging folder with pip's --target,
#   3. drops the extension modules built for other Python versions (DALI and nvImageCodec ship
#      one per Python, 3.9 to 3.15t),
#   4. packs the folder as one xz tar and splits it into .whl/parts/site.tar.xz.NN pieces of
#      PART_MIB MiB (default 55, leaving room for the working tree in each call),
#   5. writes .whl/parts/MANIFEST: the piece count and the archive's sha256 (gpu_check.sh checks it).
# .whl/ is git-ignored (.gitignore: /.whl/), so the pieces travel only when a call names them in carry.
#
# fastiaa itself is not packed: gpu_check.sh installs it from the working tree that every call sends.
set -euo pipefail

cd "$(dirname "$0")/.."
PIP="${PIP:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 ) -m pip}"
PYVER="${PYVER:-3.12}"                 # the GPU machine's python3
PART_MIB="${PART_MIB:-55}"
WHEELS=.whl/wheels
PARTS=.whl/parts
STAGE="$(mktemp -d /tmp/fastiaa-stage.XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT

# DALI for CUDA 13 (the machine's driver and torch are CUDA 13), nvImageCodec and nvJPEG that its
# GPU decoder loads (nvJPEG of CUDA 13.0, the driver's version), nvCOMP (a declared need), and the
# pure-Python needs of DALI that the machine's image lacks (six, packaging, numpy are there).
PACKAGES=(
  nvidia-dali-cuda130==2.4.0
  nvidia-nvimgcodec-cu13==0.9.0.20
  nvidia-nvjpeg==13.0.4.44
  nvidia-libnvcomp-cu13==5.3.0.16
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
)
if [ "${FAISS:-0}" = 1 ]; then
  # faiss's GPU wheels link the CUDA 12 runtime, cuBLAS and cuRAND, which the CUDA 13 image lacks
  PACKAGES+=(faiss-gpu==1.15.1 "nvidia-cuda-runtime-cu12>=12.6,<13" "nvidia-cublas-cu12>=12.6,<13"
             "nvidia-curand-cu12>=10.3.7,<11")
fi
PLATFORM=(--only-binary=:all: --python-version "$PYVER" --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$WHEELS"
echo "== downloading ${#PACKAGES[@]} packages into $WHEELS"
$PIP download -q --no-deps "${PLATFORM[@]}" -d "$WHEELS" "${PACKAGES[@]}"

echo "== installing into a staging folder"
$PIP install -q --no-deps --no-index --find-links "$WHEELS" "${PLATFORM[@]}" --target "$STAGE/site" "${PACKAGES[@]}"
tag="cpython-${PYVER/./}"
find "$STAGE/site" -name '*.cpython-*.so' ! -name "*.${tag}-*" -delete
rm -rf "$STAGE/site/bin"
du -sh "$STAGE/site"

echo "== packing (xz) and splitting into ${PART_MIB} MiB pieces"
rm -rf "$PARTS"
mkdir -p "$PARTS"
tar -C "$STAGE/site" -cf - . | xz -T0 -6 -c > "$STAGE/site.tar.xz"
split -b "${PART_MIB}M" -d -a 2 "$STAGE/site.tar.xz" "$PARTS/site.tar.xz."
{
  echo "parts $(ls "$PARTS" | grep -c '^site.tar.xz\.')"
  echo "sha256 $(sha256sum "$STAGE/site.tar.xz" | cut -d' ' -f1)"
  echo "python $PYVER"
  echo "packages ${PACKAGES[*]}"
} > "$PARTS/MANIFEST"
ls -l "$PARTS"
cat "$PARTS/MANIFEST"
