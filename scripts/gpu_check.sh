#!/usr/bin/env bash
# The GPU half of the checks, prepared to run once on a lent GPU machine (the device tool), in one call:
#   run(command="LCTRUN_COMMIT=<git rev-parse --short HEAD here> scripts/gpu_check.sh", timeout_s=560)
# 1. tests/test_cuda.py: every CUDA path against its CPU twin (serial, two workers on one GPU, DDP, bf16, profile);
# 2. `lctrun project` on the GPU for ResNet-20/56/110 (official and pooled critic) and preact-resnet101 at K=2,4,8
#    with the PCIe and NVLink presets: the projection of K GPUs like this one (issue 27, item 5); then the
#    ResNets again in bf16 with channels_last, as one trains on tensor cores.
# Everything lands in one archive, $OUT/gpu-check.tar.gz (the tool returns at most 8 files): unpack it here with
#   tar xzf gpu-check.tar.gz -C results/projection   (then commit the tables it holds, and log.txt's test result).
# Each step has its own time limit, no projection starts after BUDGET seconds, and the archive is written
# whatever fails, so one call always brings back what it measured. A dry run of the script itself, on a CPU:
#   DEVICE=cpu MODELS=cnn-small SHAPE=1,28,28 KS=2,4 scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-"resnet20 resnet56 resnet110 preact-resnet101"}
KS=${KS:-2,4,8}  # K: devices
SHAPE=${SHAPE:-3,32,32}
BUDGET=${BUDGET:-480}  # seconds: no projection starts after this, so the archive is written inside the call's limit
PY=${PYTHON:-python3}
export PYTHONPATH=. PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$OUT"
tag=$($PY -c "from lctrun.reporting.rundir import hardware_tag; from lctrun.reporting.tables import slug; \
print(slug(hardware_tag()))")
trap 'tar czf "$OUT/gpu-check.tar.gz" -C "$work" .' EXIT

{
  echo "commit ${LCTRUN_COMMIT:-unknown}; $(date -u)"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  if [ "$DEVICE" = cuda ]; then
    timeout 180 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
    echo "test_cuda rc=$?"
  fi
  BF16="precision=bf16 memory_format=channels_last"
  for extra in "" "critic.pool=4" "$BF16"; do
    for model in $MODELS; do
      # preact-resnet101 once (fp32, the official critic): its profile is the longest
      if [ "$model" = preact-resnet101 ] && [ -n "$extra" ]; then continue; fi
      case "$extra" in
        "") name="$tag-$model" ;;
        critic.pool=4) name="$tag-$model-critic-pool-4" ;;
        *) name="$tag-$model-bf16-channels-last" ;;
      esac
      if [ "$SECONDS" -ge "$BUDGET" ]; then echo "project $name skipped: ${BUDGET} s budget spent"; continue; fi
      start=$(date +%s)
      timeout 150 $PY -m lctrun project "$model" --groups "$KS" --device "$DEVICE" --shape "$SHAPE" \
        --links pcie4,nvlink --out "$work/$name" $extra
      echo "project $name rc=$? in $(( $(date +%s) - start )) s"
    done
  done
} 2>&1 | tee "$work/log.txt"
