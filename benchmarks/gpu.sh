#!/usr/bin/env bash
# One command for the first GPU: the CUDA tests, then per-trial seconds, GPU utilisation and the
# fraction of the FLOP floor at K = 1, 8, 32 (45k synthetic CIFAR-shaped images, 10 epochs), then
# kdsweep bench's ratio against a seed-style trial. Budget: under 10 minutes on a fresh machine.
#
#   bash benchmarks/gpu.sh            # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu.sh --dry-run  # on the CPU: the same steps at tiny sizes (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

if ! python -c "import kdsweep, pytest" 2>/dev/null; then
  step "install"
  python -m pip install -q -e '.[test]'
fi

if [[ $DRY == 1 ]]; then
  step "CUDA tests (skipped without a GPU; their CPU halves run)"
  python -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step "suite, dry run on the CPU"
  python -m kdsweep.tools.gpu_suite --dry-run
  exit 0
fi

nvidia-smi -L
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
step "CUDA tests"
timeout 240 python -m pytest -q -p no:cacheprovider -m 'slow or not slow' tests/test_cuda.py tests/test_fused.py  # both tiers: the compile tests are slow on CPU
step "K = 1, 8, 32"
timeout 300 python -m kdsweep.tools.gpu_suite
step "kdsweep bench: ratio against a seed-style reference trial"
timeout 120 python -m kdsweep.cli bench --device cuda --images 8192 --epochs 3
