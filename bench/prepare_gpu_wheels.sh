#!/usr/bin/env bash
# Prepare, on this machine (which reaches PyPI), the Python packages that the GPU machine of the
# device tool lacks, as pieces small enough for its 64 MiB-per-call carry limit. Then follow the
# device calls described at the top of bench/gpu_check.sh.
#
#   bash bench/prepare_gpu_wheels.sh            # DALI for CUDA 13 and its runtime needs (3 x ~58 MiB)
#   FAISS=1 bash bench/prepare_gpu_wheels.sh    # + faiss GPU with the CUDA 12 cuBLAS/cuRAND it needs
#                                               #   (~785 MB of wheels more: about 10 extra device calls)
#
# The GPU machine runs Python 3.12 with torch 2.11+cu130, Triton 3.6 and the CUDA 13 libraries that
# torch needs (KINDS.md), but neither NVIDIA DALI nor nvJPEG nor faiss. This script
#   1. downloads the wheels for CPython 3.12 / manylinux x86_64 into .whl/wheels/ (a cache),
#   2. installs them (no dependencies) into a staging folder with pip's --target,
#   3. drops the extension modules built for other Python versions (DALI and nvImageCodec ship
#      one per Python, 3.9 to 3.15t),
#   4. packs the folder as one xz tar (~175 MiB) and splits it into the fewest equal pieces of at
#      most PART_MIB MiB, .whl/parts/site.tar.xz.NN (default 58: 3 pieces, leaving ~5 MiB of each
#      call's 64 MiB for the working tree),
#   5. writes .whl/parts/MANIFEST: the piece count and the archive's sha256 (gpu_check.sh checks it).
# .whl/ is git-ignored (.gitignore: /.whl/), so the pieces travel only when a call names them in carry.
#
# fastiaa itself is not packed: gpu_check.sh installs it from the working tree that every call sends.
set -euo pipefail

cd "$(dirname "$0")/.."
PIP="${PIP:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 ) -m pip}"
PYVER="${PYVER:-3.12}"                 # the GPU machine's python3
PART_MIB="${PART_MIB:-58}"
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

echo "== packing (xz; minutes on two cores) and splitting into pieces of at most ${PART_MIB} MiB"
rm -rf "$PARTS"
mkdir -p "$PARTS"
tar -C "$STAGE/site" -cf - . | xz -T0 -6 -c > "$STAGE/site.tar.xz"
size=$(stat -c %s "$STAGE/site.tar.xz")
limit=$((PART_MIB * 1024 * 1024))
split -n $(((size + limit - 1) / limit)) -d -a 2 "$STAGE/site.tar.xz" "$PARTS/site.tar.xz."
{
  echo "parts $(ls "$PARTS" | grep -c '^site.tar.xz\.')"
  echo "sha256 $(sha256sum "$STAGE/site.tar.xz" | cut -d' ' -f1)"
  echo "python $PYVER"
  echo "packages ${PACKAGES[*]}"
} > "$PARTS/MANIFEST"

# The tests (tests/conftest.py: 48 classes, the first 8 default fonts) and bench_pipeline.py (400
# classes, all 16 default fonts) render kanji with CJK fonts that the GPU machine lacks and cannot
# install. Pack the 16 default fonts cut down to the first 512 JIS level-1 kanji that all of them
# cover (~2 MiB instead of 120): .whl/parts/fonts.tar.xz, unpacked by gpu_check.sh under
# /usr/share/fonts.
echo "== cutting the kanji fonts down to 512 characters"
PY="${PIP% -m pip}"
$PY - "$STAGE/fonts" <<'PYEOF'
import subprocess, sys
from pathlib import Path
import numpy as np
from fontTools.ttLib import TTFont
from fastiaa.data.kanji import DEFAULT_FONTS, FONT_CATALOGUE, FONT_DIR, jis_kanji

out = Path(sys.argv[1])
specs = [FONT_CATALOGUE[name] for name in DEFAULT_FONTS]
missing = [str(spec.path) for spec in specs if not spec.path.is_file()]
if missing:
    sys.exit(f"fonts missing here: {missing}; run `fastiaa data kanji --out data/kanji` first (installs them)")
codepoints, levels = jis_kanji()
keep = codepoints[levels == 1]
for spec in specs:
    keep = keep[np.isin(keep, list(TTFont(spec.path, fontNumber=0, lazy=True).getBestCmap()))]
unicodes = ",".join(f"U+{c:04X}" for c in keep[:512])
for spec in specs:
    target = out / spec.file
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).with_name("pyftsubset")), str(spec.path), f"--unicodes={unicodes}",
                    "--no-hinting", "--drop-tables+=gasp", f"--output-file={target}"],
                   check=True, stderr=subprocess.DEVNULL)
print(f"{len(specs)} fonts, {min(len(keep), 512)} kanji each, {sum(f.stat().st_size for f in out.rglob('*.ttf')) / 2**20:.1f} MiB")
PYEOF
tar -C "$STAGE/fonts" -cJf "$PARTS/fonts.tar.xz" .
ls -l "$PARTS"
cat "$PARTS/MANIFEST"
