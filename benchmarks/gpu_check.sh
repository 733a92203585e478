#!/usr/bin/env bash
# One GPU check, sized to finish in about 8 minutes on one GPU, run from the repo root with the
# machine's own PyTorch (the package is used in place, nothing is installed). Prints JSON lines:
#   1. the pseudo-labelling step (propagate) at N = 50,000, C = 10 and C = 100, on the GPU and, for
#      comparison, on this machine's CPU (the published algorithm is not rerun: see
#      docs/performance.md for its CPU figures);
#   2. training throughput: whole semi-supervised epochs through the real loaders next to the bare
#      model step, WRN-28-2 on CIFAR-shaped random data (40 labels), for PIL augmentation + fp32
#      (one forward pass per augmented copy, as published, and --fused-copies) and the batched
#      device augmentation + bf16 + channels-last (with and without torch.compile);
#   3. DRL pretraining at the published CIFAR-10 size (NCSN++ small, WRN-28-2, batch 100): whole
#      steps through the real loader next to the bare step, fp32 and bf16, compiled and not.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY - <<'PYEOF'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PYEOF
for case in "10 4000" "100 10000"; do
  set -- $case
  timeout 120 $PY benchmarks/bench_propagation.py --n 50000 --d 128 --classes "$1" --labeled "$2" \
    --repeats 3 --no-reference --device cuda
  timeout 120 $PY benchmarks/bench_propagation.py --n 50000 --d 128 --classes "$1" --labeled "$2" \
    --repeats 1 --no-reference
done
workers=$(( $(nproc) > 8 ? 8 : $(nproc) ))
timeout 300 $PY benchmarks/throughput.py --device cuda --kinds ssl --arch wrn-28-2 --images 4000 --labels 40 \
  --workers "$workers" --configs "cpu-aug,fp32;cpu-aug,fp32,fused;gpu-aug,bf16,cl;gpu-aug,bf16,cl,compile"
timeout 300 $PY benchmarks/throughput.py --device cuda --kinds drl --recipe cifar10 --images 4000 --steps 50 \
  --workers "$workers" --configs "fp32;bf16;fp32,compile;bf16,compile"
