#!/usr/bin/env bash
# One command for the first GPU: per-trial seconds, GPU utilisation and the fraction of the FLOP floor at
# K = 1, 8, 32 (45k synthetic CIFAR-shaped images, 10 epochs), kdsweep bench's ratio against a seed-style
# trial, then the CUDA tests (CUDA-graph capture of the compiled fused step among them), within 560 s
# ($GPU_SH_SECONDS) to fit the device tool's 600 s a command. Each step runs whatever the one before did; the
# script fails at the end if one failed. With $OUT set (the device tool's folder that comes back) the whole
# log is also kept in $OUT/gpu.log.
#
#   bash benchmarks/gpu.sh --fetch-wheels  # where pip reaches an index: what the GPU machine lacks, into .whl/
#   bash benchmarks/gpu.sh                 # on the machine with an NVIDIA GPU
#   bash benchmarks/gpu.sh --dry-run       # on the CPU: the suite at tiny sizes and test_cuda.py's CPU halves (CI runs this)
#
# The lent GPU machine reaches no package index and its image has torch, pandas, scipy and pytest but not
# mlflow, optuna or mnist1d: benchmarks/gpu_wheels.txt lists those and what they need (CPython 3.12, x86-64,
# about 37 MB); carry .whl/ with the working tree and this script installs them from it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-}
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
[[ -n ${OUT:-} && -d ${OUT:-} ]] && exec > >(tee -a "$OUT/gpu.log") 2>&1

if [[ $mode == --fetch-wheels ]]; then
  grep -v '^#' benchmarks/gpu_wheels.txt | xargs "$PY" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "${WHEELS_PYTHON:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl || exit 1
  du -sh .whl
  exit 0
fi

if [[ $mode != --dry-run ]] && ! command -v nvidia-smi >/dev/null; then
  echo "gpu.sh: no nvidia-smi here: on a machine without an NVIDIA GPU run bash benchmarks/gpu.sh --dry-run"
  exit 2
fi
if ! "$PY" -c "import mlflow, optuna, mnist1d, pytest" 2>/dev/null; then
  step "install"
  if [[ -d .whl ]]; then  # no index there: the carried wheels, beside the image's own packages
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdsweep-site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/kdsweep-site${PYTHONPATH:+:$PYTHONPATH}
  elif "$PY" -c "import sys; sys.exit(sys.prefix == sys.base_prefix)"; then
    "$PY" -m pip install -q -e '.[test]' || exit 1
  else  # never into the system's Python
    echo "gpu.sh: $PY lacks kdsweep's dependencies and is not a virtual environment: activate one (or carry .whl/)"
    exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # kdsweep from this checkout, installed or not

if [[ $mode == --dry-run ]]; then
  set -e
  step "CUDA tests (skipped without a GPU; their CPU halves run)"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step "suite, dry run on the CPU"
  "$PY" -m kdsweep.tools.gpu_suite --dry-run
  exit 0
fi

# The device tool stops a command at 600 s: the steps share what is left of $GPU_SH_SECONDS (default 560, counted
# from the script's start, the install included), each within its own limit, so the script reaches its summary.
BUDGET=${GPU_SH_SECONDS:-560}
left() { local l=$((BUDGET - SECONDS)); ((l > $1)) && l=$1; ((l < 10)) && l=10; echo "$l"; }
failed=()
run() {  # run NAME COMMAND...: a failed step is said and remembered, and the next one runs
  local name=$1 code
  shift
  step "$name"
  "$@"
  code=$?
  ((code == 0)) || { echo "!! $name failed (exit $code)"; failed+=("$name"); }
}

nvidia-smi -L
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
"$PY" -c "import mlflow, optuna; print('mlflow', mlflow.__version__, 'optuna', optuna.__version__)"
run "K = 1, 8, 32" timeout "$(left 300)" "$PY" -m kdsweep.tools.gpu_suite
run "kdsweep bench: ratio against a seed-style reference trial" \
  timeout "$(left 120)" "$PY" -m kdsweep.cli bench --device cuda --images 8192 --epochs 3
# Both tiers: the compile tests are slow on CPU. -s: the CUDA-graph test prints inductor's counters.
run "CUDA tests" timeout "$(left 240)" "$PY" -m pytest -q -s -p no:cacheprovider -m 'slow or not slow' tests/test_cuda.py tests/test_fused.py
((${#failed[@]} == 0)) || { echo "failed: ${failed[*]}"; exit 1; }
