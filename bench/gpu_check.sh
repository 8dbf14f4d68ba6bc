#!/usr/bin/env bash
# The GPU check of fastiaa: one device call gives the headline table; DALI is a second, optional run.
# Made for the H200 machine of the device tool (Python 3.12, torch 2.11 + CUDA 13, Triton 3.6, no
# package registry, 64 MiB carried per call, 15 device minutes per session); runs on any CUDA
# Linux box. Without CUDA it says so in one line and exits 0, running nothing.
#
# ---- run 1, the headline: needs nothing carried and nothing from an earlier call --------------
#   run(command="bash bench/gpu_check.sh", timeout_s=500)
# Stages: env, install (fastiaa copied from the working tree the call sends), tests (pytest -m gpu:
# compiled kernels against float64, AMP training steps, evaluation on the GPU; the DALI and faiss
# GPU tests skip), kernels (registers: ahead of time and from the driver), synthesis and
# estimator timings, the evaluator at SOP size, bench_train with the torchvision loader.
# $OUT/gpu_check.md is the report (stage summary, then every table), $OUT/gpu_check.log the logs.
#
# ---- run 2, DALI (optional): the pieces of bench/prepare_gpu_wheels.sh, one per call ----------
# Here, once: bash bench/prepare_gpu_wheels.sh (writes the ignored .whl/parts/: 3 pieces of <= 58 MiB,
# fonts.tar.xz, MANIFEST). Then three calls in a row on the warm machine (it stays warm ~30 s after
# a call; a cold one has lost the earlier pieces, and the DALI stage then says so and stops):
#   a. run(command="bash bench/gpu_check.sh park", carry=[".whl/parts/site.tar.xz.00", ".whl/parts/MANIFEST"], timeout_s=60)
#   b. run(command="bash bench/gpu_check.sh park", carry=[".whl/parts/site.tar.xz.01"], timeout_s=60)
#   c. run(command="STAGES='env install dali' BUDGET_S=240 bash bench/gpu_check.sh",
#          carry=[".whl/parts/site.tar.xz.02", ".whl/parts/MANIFEST", ".whl/parts/fonts.tar.xz"], timeout_s=300)
#
# Stages run in order, each with its own time cap; the caps of a run's stages add up to less than
# its BUDGET_S (tests/test_gpu_check.py checks the arithmetic); a failed or timed-out stage is
# logged and the next one runs.
set -u

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
PARTS=/tmp/fastiaa-parts
if [ "${1:-}" = park ]; then   # keep the pieces this call carried for a later call
  mkdir -p "$PARTS" && cp .whl/parts/* "$PARTS"/ 2>/dev/null; ls -l "$PARTS"; exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY sees no CUDA device here, nothing checked (run it on a GPU machine: see the top of bench/gpu_check.sh)"
  exit 0
fi

OUT="${OUT:-/tmp/gpu_check_out}"   # the device tool sets OUT
BUDGET_S="${BUDGET_S:-420}"
STAGES="${STAGES:-env install tests kernels synthesis estimator eval train}"
SITE="${SITE:-/tmp/fastiaa-site}"
LOGS="$(mktemp -d /tmp/gpu_check_logs.XXXXXX)"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$(date +%s)
SUMMARY="| stage | status | seconds |
|---|---|---|"

elapsed() { echo $(($(date +%s) - START)); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }

# stage NAME CAP_SECONDS COMMAND: run COMMAND (bash -c) with a timeout of min(CAP, budget left),
# output to $LOGS/NAME.log (and its tail to the console), one summary row; never stops the script.
stage() {
  local name="$1" cap="$2" cmd="$3" left limit t0 rc status
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  left=$((BUDGET_S - $(elapsed) - 5))
  if [ "$left" -lt 10 ]; then
    SUMMARY+=$'\n'"| $name | skipped (time budget) | 0 |"
    say "skip $name: budget spent"
    return 0
  fi
  limit=$((cap < left ? cap : left))
  say "start $name (limit ${limit}s)"
  t0=$(date +%s)
  STAGE_LIMIT="$limit" timeout -k 10 "$limit" bash -c "$cmd" > "$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  tail -n 40 "$LOGS/$name.log" | sed 's/.*\r//'     # progress bars: keep what follows the last \r
  SUMMARY+=$'\n'"| $name | $status | $(($(date +%s) - t0)) |"
  say "end $name: $status"
}

# fastiaa from this working tree into $SITE (a plain copy of the package-dir map of pyproject.toml)
install_fastiaa() {
  rm -rf "$SITE/fastiaa" && mkdir -p "$SITE"
  cp -r fastiaa "$SITE/fastiaa" && cp -r kernels "$SITE/fastiaa/kernels" && cp -r pipelines "$SITE/fastiaa/pipelines"
  PYTHONPATH="$SITE" "$PY" -P -c "import fastiaa, fastiaa.kernels, fastiaa.pipelines, torch, triton; print('fastiaa from', fastiaa.__file__, '| torch', torch.__version__, '| triton', triton.__version__)"
}

# DALI and its libraries from the carried pieces (run 2): reassemble, check the sha256, unpack
unpack_dali() {
  local manifest="" n want have parts=()
  [ -f "$SITE/.dali" ] && { echo "DALI already unpacked in $SITE"; return 0; }
  for dir in "$PARTS" .whl/parts; do [ -f "$dir/MANIFEST" ] && manifest="$dir/MANIFEST"; done
  [ -n "$manifest" ] || { echo "no MANIFEST: carry the pieces (calls a-c at the top of bench/gpu_check.sh)"; return 3; }
  n=$(awk '/^parts/{print $2}' "$manifest"); want=$(awk '/^sha256/{print $2}' "$manifest")
  for i in $(seq -f %02g 0 $((n - 1))); do
    if [ -f "$PARTS/site.tar.xz.$i" ]; then parts+=("$PARTS/site.tar.xz.$i")
    elif [ -f ".whl/parts/site.tar.xz.$i" ]; then parts+=(".whl/parts/site.tar.xz.$i")
    else echo "piece site.tar.xz.$i missing: the machine went cold between the calls; start again at call a"; return 3; fi
  done
  have=$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)
  [ "$have" = "$want" ] || { echo "sha256 mismatch ($have, MANIFEST $want): pieces of two prepare runs?"; return 3; }
  cat "${parts[@]}" | xz -d -T0 | tar -x -C "$SITE" || return 3
  for fonts in "$PARTS/fonts.tar.xz" .whl/parts/fonts.tar.xz; do
    [ -f "$fonts" ] && mkdir -p /usr/share/fonts && tar -xJf "$fonts" -C /usr/share/fonts --skip-old-files && break
  done
  touch "$SITE/.dali"
  echo "unpacked ${#parts[@]} pieces into $SITE"
}

mkdir -p "$LOGS/bin"   # kanji builds must not wait on apt-get: there is no registry there
printf '#!/bin/sh\necho "apt-get: no package registry on this machine (gpu_check.sh)" >&2\nexit 100\n' > "$LOGS/bin/apt-get"
chmod +x "$LOGS/bin/apt-get"
export PATH="$LOGS/bin:$PATH"
# every stage imports fastiaa from $SITE and bench from the repository (python -P: the root's own
# fastiaa/, without its kernels and pipelines, must not shadow the installed one)
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
libs=$(find "$SITE/nvidia" -maxdepth 3 -type d \( -name lib -o -name lib64 \) 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}$SITE/nvidia/nvimgcodec${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
RUN="$PY -P -m"

say "fastiaa GPU check in $REPO, budget ${BUDGET_S}s, stages: $STAGES"
stage env 15 "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(), \"| triton\", triton.__version__)'; nproc"
stage install 20 "$(declare -f install_fastiaa); SITE='$SITE' PY='$PY'; install_fastiaa"
stage tests 100 "$RUN pytest -q -m gpu -rs -p no:cacheprovider -o pythonpath= tests"
stage kernels 30 "$RUN bench.bench_kernels --device cuda --workers 8"
stage synthesis 25 "$RUN bench.bench_synthesis --repeats 10"
stage estimator 35 "$RUN bench.bench_estimator --gpu-only"
stage eval 45 "$RUN bench.bench_eval --device cuda --methods 'fastiaa torch' 'full product'"
stage train 120 "$RUN bench.bench_train --device cuda --loader torchvision --budget-s \$((STAGE_LIMIT - 30)) --out $LOGS/bench_train.md"
stage dali 190 "$(declare -f unpack_dali); SITE='$SITE' PARTS='$PARTS'; unpack_dali && $RUN pytest -q -m gpu -rs -p no:cacheprovider -o pythonpath= tests/test_pipelines.py && $RUN bench.bench_pipeline --threads 8 && $RUN bench.bench_train --device cuda --loader dali --backbones googlenet --no-authors --budget-s 60 --out $LOGS/bench_train.md"

# ---- the report: summary first, then every Markdown table the stages printed -----------------
{
  echo "# fastiaa GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes'); total $(elapsed) s"
  echo
  echo "$SUMMARY"
  for name in tests kernels synthesis estimator eval train dali; do
    [ -f "$LOGS/$name.log" ] || continue
    echo
    echo "## $name"
    echo
    if [ "$name" = tests ]; then grep -E "passed|failed|error|SKIPPED" "$LOGS/$name.log" | tail -n 30
    elif [ -f "$LOGS/bench_train.md" ] && [ "$name" = train ]; then cat "$LOGS/bench_train.md"
    else grep -E '^(\||#|Projected|GPU|~|[0-9]+ kernels)' "$LOGS/$name.log" || echo "(no table: see gpu_check.log)"; fi
  done
} > "$OUT/gpu_check.md"
for f in "$LOGS"/*.log; do echo "===== $(basename "$f")"; tail -c 2000000 "$f" | sed 's/.*\r//'; done > "$OUT/gpu_check.log"
rm -rf "$LOGS"
echo
echo "$SUMMARY"
say "report: $OUT/gpu_check.md, logs: $OUT/gpu_check.log"
