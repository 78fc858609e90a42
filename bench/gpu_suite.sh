#!/usr/bin/env bash
# One command for a GPU's few minutes: stages in priority order, each in its own time box; a stage that fails or
# runs out of time is logged and the next one runs. Benchmarks write results/bench_nll.md and results/bench_train.md;
# the short training runs write into a scratch folder (never results/). Everything (log, tables, scratch) is packed
# into $OUT/suite.tgz when $OUT is set (the device tool), else into gpu_suite_out/.
#
#   bash bench/gpu_suite.sh                  # on the GPU machine: its own python3, MNIST in data/mnist
#   PYTHON=.venv/bin/python TINY=1 bash bench/gpu_suite.sh   # the plumbing on a CPU, in seconds per stage
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-gpu_suite_out}
SCRATCH=${SCRATCH:-/tmp/gpu_suite_scratch}
mkdir -p "$OUT_DIR" "$SCRATCH"
LOG="$OUT_DIR/suite.log"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if [ "${TINY:-0}" = 1 ]; then  # CPU plumbing check: every stage, tiny sizes
  RESULTS=$SCRATCH  # a plumbing run never touches results/
  DEV=(--device cpu); NLL=(--batch-sizes 8 --rep-ms 1 --warmup-ms 1)
  TRAIN=(--datasets mnist --steps 2 --warmup 1 --batch-size 8)
  RUN=(--max-train-images 256 --epochs 1 --eval-images 64 --iwae-images 8 --iwae-k 2); TWO_D=(--steps 20 --seeds 2 --hidden 16 --eval-points 200 --iwae-points 50)
else
  RESULTS=results
  DEV=(--device cuda); NLL=(--batch-sizes 1024 4096 --rep-ms 50 --warmup-ms 10)
  TRAIN=(--datasets mnist celeba --steps 200 --warmup 15 --row-seconds 5 --ablations)
  RUN=(--epochs 2 --eval-every 2); TWO_D=(--steps 2000 --seeds 10 --hidden 200)
fi

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 box=$2 started rc
  shift 2
  echo "=== $name (time box ${box} s): $*" | tee -a "$LOG"
  started=$(date +%s)
  timeout -k 10 "$box" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - started)) s$([ $rc = 124 ] && echo ' (time box reached)')" | tee -a "$LOG"
}

stage env 20 bash -c "nvidia-smi || true; $PY -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'; nproc; free -g"
if [ "${TINY:-0}" != 1 ]; then
  stage gpu-tests 120 "$PY" -m pytest -m gpu tests/test_gpu.py -v -s -p no:cacheprovider
fi
stage bench-nll 60 "$PY" bench/bench_nll.py "${NLL[@]}" --out "$RESULTS/bench_nll.md"
stage bench-train 150 "$PY" bench/bench_train.py --sigmas learned "${DEV[@]}" "${TRAIN[@]}" \
  --out "$RESULTS/bench_train.md"
stage mnist-lv 110 "$PY" train_images.py --dataset mnist --sigma learned --data-dir data/mnist "${DEV[@]}" "${RUN[@]}" \
  --logdir "$SCRATCH/runs" --out "$SCRATCH/images"
stage 2d-paper-size 60 "$PY" train_2d.py "${DEV[@]}" "${TWO_D[@]}" --out "$SCRATCH/2d" --logdir "$SCRATCH/runs2d"

tar czf "$OUT_DIR/suite.tgz" "$LOG" "$RESULTS/bench_nll.md" "$RESULTS/bench_train.md" \
  $(find "$SCRATCH" -name '*.md' -o -name '*.jsonl' -o -name '*.png' | grep -v runs) 2>>"$LOG"
echo "=== packed $OUT_DIR/suite.tgz" | tee -a "$LOG"
