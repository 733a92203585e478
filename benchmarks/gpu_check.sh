#!/usr/bin/env bash
# GPU check for issue 6, sized to finish in well under 8 minutes on one GPU:
# images/s of one WRN-28-2 SSL step (batch 100 x aug_num 3) and one DRL pretraining step on random
# CIFAR-shaped data, for (a) CPU-PIL augmentation + fp32 and (b) GPU augmentation + bf16 +
# channels_last, with and without torch.compile. Runs from the repo root with the machine's own
# PyTorch (no install: the package is used in place). One JSON line per configuration.
#   bash benchmarks/gpu_check.sh [extra throughput.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY - <<'PYEOF'
import torch
print({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
PYEOF
workers=$(( $(nproc) > 8 ? 8 : $(nproc) ))
timeout 420 $PY benchmarks/throughput.py --device cuda --arch wrn-28-2 --steps 40 --warmup 8 \
  --workers "$workers" \
  --configs "cpu-aug,fp32;gpu-aug,bf16,cl;gpu-aug,bf16,cl,compile" "$@"
