#!/usr/bin/env bash
# One GPU check: the native backend's CUDA tests and benchmark, then (if its sources were carried) MegaBlocks'
# build, parity tests and benchmark; every step time-boxed, everything appended to one results file.
#
#   benchmarks/gpu_check.sh prepare        # where a package registry is reachable: fetch the sdists into
#                                          # .gpu_sources/ and patch MegaBlocks for CUDA 13's CUB (run once)
#   benchmarks/gpu_check.sh run            # on the GPU machine (no network needed): < 9 minutes in all
#   benchmarks/gpu_check.sh run --dry-run  # the steps and time boxes, checks of what is carried; runs nothing
#
# Results go to $OUT/gpu_check_results.md when $OUT is set, else benchmarks/results/gpu_check_<UTC time>.md.
# A slow MegaBlocks build cannot eat the native results: those steps run first, and each build step's time box
# leaves room for the MegaBlocks tests and benchmark after it (they are skipped when the build did not finish).
# Time boxes (seconds) can be changed through the environment: GPU_CHECK_BUDGET_S (whole run) and the
# BOX_* variables below. GPU_CHECK_SIMULATE=1 replaces every command by a `sleep` that overruns its box (no GPU
# needed), to see the time boxes and the budget at work.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/.gpu_sources"
PATCH="$ROOT/benchmarks/gpu_patches/megablocks-0.10.0-cub-debug-synchronous.patch"
PY="${PYTHON:-python}"
MEGABLOCKS=megablocks-0.10.0
STK=stanford_stk-0.7.1
GROUPED_GEMM=grouped_gemm-0.3.0

BUDGET_S="${GPU_CHECK_BUDGET_S:-500}"     # the whole run: 8 min 20 s, under the 9 min we are lent
MIN_STEP_S="${GPU_CHECK_MIN_STEP_S:-10}"  # a step with less time than this left is skipped, not started
BOX_INFO="${BOX_INFO:-20}"
BOX_NATIVE_TESTS="${BOX_NATIVE_TESTS:-75}"
BOX_NATIVE_BENCH="${BOX_NATIVE_BENCH:-60}"
BOX_BUILD_STK="${BOX_BUILD_STK:-30}"
BOX_BUILD_GG="${BOX_BUILD_GG:-150}"       # grouped_gemm: CUTLASS templates, the longest compile
BOX_BUILD_MB="${BOX_BUILD_MB:-120}"
BOX_MB_TESTS="${BOX_MB_TESTS:-50}"
BOX_MB_BENCH="${BOX_MB_BENCH:-60}"
RESERVE_AFTER_BUILD="${GPU_CHECK_RESERVE_S:-$((BOX_MB_TESTS + 30))}"  # a build step stops early enough for the parity tests (+ a short bench)

# Step table: name | time box | seconds kept back for later steps | command. The native steps come first.
NATIVE_TESTS="tests/test_experts.py tests/test_experts_cuda.py tests/test_experts_megablocks.py"
STEPS=(
  "gpu-info|$BOX_INFO|0|step_info"
  "native-cuda-tests|$BOX_NATIVE_TESTS|0|$PY -m pytest -rs -q -p no:cacheprovider $NATIVE_TESTS"
  "native-cuda-bench|$BOX_NATIVE_BENCH|0|$PY -m benchmarks.bench_moe_layer --device cuda --reps 10"
  "build-stanford-stk|$BOX_BUILD_STK|$RESERVE_AFTER_BUILD|step_install $STK.tar.gz"
  "build-grouped_gemm|$BOX_BUILD_GG|$RESERVE_AFTER_BUILD|step_install $GROUPED_GEMM.tar.gz"
  "build-megablocks|$BOX_BUILD_MB|$RESERVE_AFTER_BUILD|step_install $MEGABLOCKS"
  "megablocks-parity-tests|$BOX_MB_TESTS|0|$PY -m pytest -rs -q -p no:cacheprovider tests/test_experts_megablocks.py"
  "megablocks-bench|$BOX_MB_BENCH|0|$PY benchmarks/bench_megablocks.py --reps 10"
)

die() { echo "gpu_check: $*" >&2; exit 2; }

# --- prepare (network) ---------------------------------------------------------------------------------------

prepare() {
  mkdir -p "$SRC"
  cd "$SRC" || die "cannot enter $SRC"
  echo "== downloading sdists into $SRC"
  "$PY" -m pip download --no-binary :all: --no-deps --no-build-isolation -d "$SRC" \
    megablocks==0.10.0 stanford-stk==0.7.1 || die "pip download of megablocks/stanford-stk failed"
  # grouped_gemm's setup.py asks torch for the GPU's capability and CUDA_HOME while pip only reads its metadata,
  # which fails on a CPU-only torch. A shim (for this one pip call) answers both; nothing is built here.
  if [ ! -f "$GROUPED_GEMM.tar.gz" ]; then
    local shim; shim="$(mktemp -d)"
    mkdir -p "$shim/cuda/lib64"
    cat > "$shim/sitecustomize.py" <<EOF
import torch.cuda, torch.utils.cpp_extension as _ext
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # metadata only: the real build reads the real GPU
_ext.CUDA_HOME = "$shim/cuda"
EOF
    PYTHONPATH="$shim" "$PY" -m pip download --no-binary :all: --no-deps --no-build-isolation -d "$SRC" \
      grouped_gemm==0.3.0 || die "pip download of grouped_gemm failed"
    rm -rf "$shim"
  fi
  [ "$(tar tzf "$GROUPED_GEMM.tar.gz" | grep -c 'third_party/cutlass/include/cutlass/cutlass.h$')" = 1 ] \
    || die "$GROUPED_GEMM.tar.gz lacks its CUTLASS sources (third_party/cutlass)"
  echo "== extracting $MEGABLOCKS and applying $(basename "$PATCH")"
  rm -rf "$MEGABLOCKS"
  tar xzf "$MEGABLOCKS.tar.gz" || die "cannot extract $MEGABLOCKS.tar.gz"
  patch -d "$MEGABLOCKS" -p1 --forward --no-backup-if-mismatch < "$PATCH" || die "the CUB patch did not apply"
  check_patched || die "the CUB patch applied but debug_synchronous is still passed to CUB"
  echo "== carried (copy .gpu_sources/ with the tree):"
  ls -la "$SRC"
  echo "prepare: done; on the GPU machine run: benchmarks/gpu_check.sh run"
}

# The patch removes the argument CUB dropped in CUDA 13 from both DeviceScan calls; the parameter stays unused.
check_patched() {
  local h="$SRC/$MEGABLOCKS/csrc/cumsum.h"
  [ -f "$h" ] || return 1
  [ "$(grep -c 'stream));' "$h")" = 2 ] && ! grep -q '^[[:space:]]*debug_synchronous));' "$h"
}

# --- run (GPU machine) ---------------------------------------------------------------------------------------

step_info() {
  date -u
  echo "host: $(hostname), $(nproc) cores"
  nvidia-smi || echo "(nvidia-smi failed)"
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
  echo "ninja: $(command -v ninja || echo 'absent (torch extensions then compile serially; MAX_JOBS unused)')"
  "$PY" - <<'EOF'
import importlib.util, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
from torch.utils.cpp_extension import CUDA_HOME
print(f"CUDA_HOME (torch extensions): {CUDA_HOME}")
for m in ("pytest", "lightning", "torchmetrics", "jsonargparse", "numpy", "triton", "setuptools",
          "megablocks", "stk", "grouped_gemm"):
    print(f"  {m}: {'present' if importlib.util.find_spec(m) else 'MISSING'}")
EOF
}

step_install() {
  local what="$1"
  [ -e "$SRC/$what" ] || { echo "not carried: $SRC/$what"; return 3; }
  # --no-deps --no-build-isolation: MegaBlocks pins torch 2.7.0 and numpy < 2.1; keep the machine's torch.
  "$PY" -m pip install --no-build-isolation --no-deps --no-index "$SRC/$what" || return $?
  if [ "$what" = "$MEGABLOCKS" ]; then
    # setup.py skips the extension silently unless torch's version says "cu" and CUDA_HOME is found.
    "$PY" -c "import megablocks_ops, grouped_gemm_backend, megablocks.layers.dmoe; print('megablocks_ops: imports')"
  fi
}

# Arch list from the GPU (e.g. 9.0 on H100/H200): one architecture only, so nvcc compiles once.
gpu_arch() {
  "$PY" -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null
}

have_cuda() {
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

run_steps() {
  local dry="$1" results="$2" start now left box reserve name cmd status t0 t1 skip_mb=0 worst=0
  start=$(date +%s)
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name box reserve cmd <<< "$entry"
    case "$name" in build-*|megablocks-*) [ -d "$SRC" ] || { skip_mb=2; }; esac
    now=$(date +%s); left=$((BUDGET_S - (now - start)))
    [ "$dry" = 1 ] && left=$((BUDGET_S - worst))   # the schedule if every earlier step ran to its box
    local limit=$box
    [ $((left - reserve)) -lt "$limit" ] && limit=$((left - reserve))
    [ "$limit" -lt 0 ] && limit=0
    if [ "$dry" = 1 ]; then
      printf '  %-24s box %3ss, keeps %3ss for later; worst case gets %3ss, from t=%3ss  %s\n' \
        "$name" "$box" "$reserve" "$limit" "$worst" "$cmd"
      [ "$limit" -ge "$MIN_STEP_S" ] && worst=$((worst + limit))
      continue
    fi
    [ -n "${GPU_CHECK_SIMULATE:-}" ] && cmd="sleep 1000"   # exercises the time boxes on any machine
    {
      echo
      echo "## $name (time box ${limit}s of ${box}s; $(date -u +%H:%M:%S) UTC, ${left}s of the budget left)"
      echo '```'
    } >> "$results"
    if [ "$skip_mb" != 0 ] && [[ "$name" == build-* || "$name" == megablocks-* ]]; then
      status="SKIPPED: $( [ "$skip_mb" = 2 ] && echo "no .gpu_sources/ carried" || echo "an earlier build step failed")"
    elif [ "$limit" -lt "$MIN_STEP_S" ]; then
      status="SKIPPED: ${left}s of the ${BUDGET_S}s budget left, ${reserve}s of it kept for later steps"
      [[ "$name" == build-* ]] && skip_mb=1
    else
      t0=$(date +%s)
      if [[ "$cmd" == step_* ]]; then
        export -f step_info step_install; export PY SRC MEGABLOCKS
        timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$results" 2>&1
      else
        # shellcheck disable=SC2086  # the command is a word list on purpose
        timeout --kill-after=10 "$limit" $cmd >> "$results" 2>&1
      fi
      local rc=$?
      t1=$(date +%s)
      if [ $rc = 124 ] || [ $rc = 137 ]; then status="TIMED OUT after $((t1 - t0))s (box ${limit}s), exit $rc"
      else status="exit $rc after $((t1 - t0))s"; fi
      [[ "$name" == build-* ]] && [ $rc != 0 ] && skip_mb=1
    fi
    { echo '```'; echo "**$name: $status**"; } >> "$results"
    echo "  $name: $status"
  done
}

run() {
  local dry=0
  [ "${1:-}" = "--dry-run" ] && dry=1
  cd "$ROOT" || die "cannot enter $ROOT"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the tree's package, installed or not
  export MAX_JOBS="$(nproc)"
  local arch=""
  have_cuda && arch="$(gpu_arch)"
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST="$arch"
  echo "gpu_check run: budget ${BUDGET_S}s; MAX_JOBS=$MAX_JOBS; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<from the GPU>}"
  if [ -d "$SRC" ]; then
    local missing=""
    for f in "$STK.tar.gz" "$GROUPED_GEMM.tar.gz" "$MEGABLOCKS/setup.py"; do [ -e "$SRC/$f" ] || missing+=" $f"; done
    if [ -n "$missing" ]; then echo "  .gpu_sources/ lacks:$missing (rerun prepare)"
    elif check_patched; then echo "  .gpu_sources/: all three sources carried; MegaBlocks' CUB patch is applied"
    else echo "  .gpu_sources/: MegaBlocks' CUB patch is NOT applied (rerun prepare); its build will fail on CUDA 13"; fi
  else
    echo "  no .gpu_sources/: only the native steps run (benchmarks/gpu_check.sh prepare fetches MegaBlocks)"
  fi
  echo "steps, in order:"
  run_steps 1 /dev/null
  local total=0; for entry in "${STEPS[@]}"; do IFS='|' read -r _ box _ _ <<< "$entry"; total=$((total + box)); done
  echo "sum of time boxes ${total}s; the run stops at ${BUDGET_S}s whatever the boxes say"
  bash -n "${BASH_SOURCE[0]}" && echo "script syntax: ok"
  local f absent=""
  for f in $NATIVE_TESTS benchmarks/bench_moe_layer.py benchmarks/bench_megablocks.py; do
    [ -e "$ROOT/$f" ] || absent+=" $f"
  done
  [ -z "$absent" ] && echo "tests and benchmarks named by the steps: present" || echo "MISSING from the tree:$absent"
  "$PY" -c "import lightning_moe, pytest, benchmarks.bench_moe_layer" 2>/dev/null \
    && echo "python imports (lightning_moe from the tree, pytest, the benchmark): ok" \
    || echo "python imports FAIL: $("$PY" -c 'import lightning_moe, pytest, benchmarks.bench_moe_layer' 2>&1 | tail -1)"
  [ "$dry" = 1 ] && { echo "dry run: nothing executed"; return 0; }
  if ! have_cuda && [ -z "${GPU_CHECK_SIMULATE:-}" ]; then
    echo "gpu_check: no CUDA GPU is visible to torch ($("$PY" -c 'import torch; print(torch.__version__, "CUDA build:", torch.version.cuda is not None)' 2>&1)); $(command -v nvidia-smi >/dev/null && echo 'nvidia-smi is present' || echo 'no nvidia-smi'). Nothing was measured: run this on a CUDA machine." >&2
    exit 3
  fi
  local dir="${OUT:-$ROOT/benchmarks/results}"
  mkdir -p "$dir"
  local results="$dir/gpu_check_results.md"
  [ -z "${OUT:-}" ] && results="$dir/gpu_check_$(date -u +%Y%m%dT%H%M%SZ).md"
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)'); budget ${BUDGET_S}s; MAX_JOBS=$MAX_JOBS; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
  } > "$results"
  echo "results: $results"
  run_steps 0 "$results"
  echo "done: $results"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: benchmarks/gpu_check.sh prepare | run [--dry-run]" >&2; exit 2 ;;
esac
