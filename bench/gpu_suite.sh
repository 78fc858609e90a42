#!/usr/bin/env bash
# The one command that spends a lent GPU's minutes (15 a session, ~12 usable, 10 a command): time-boxed stages within
# one budget of $BUDGET s (default 540); each stage is logged; one that fails or runs out of time never stops the next.
#
#   bash bench/gpu_suite.sh [STAGE ...]      # on the GPU machine: stages env nll train tests 2d mnist (default all)
#   PYTHON=.venv/bin/python TINY=1 MNIST_DIR=<MNIST-format IDX files> bash bench/gpu_suite.sh   # CPU plumbing, ~25 s
#
# In order, alone on the GPU so that their timings are honest: env (nvidia-smi, versions; 20 s), nll
# (bench/bench_nll.py and its launch-configuration sweep; 90 s), train (bench/bench_train.py, ablations and profile; 200 s). Then 2d (train_2d.py --preset
# paper) in the background until the budget ends, beside tests (pytest -m gpu; 120 s) and mnist: one MNIST row of
# Table 2 ($MNIST_ROW, default learned: LV-VAE) toward the paper's 1,000 epochs, continued from $CKPT_DIR/mnist_<row>/
# (an earlier session's checkpoint pieces) and stopped by its time box with a checkpoint saved. The stage celeba (only
# when named) trains the CelebA rows $CELEBA_ROWS (default: fixed learned, the paper's two) one after the other for
# $CELEBA_EPOCHS (default 200, the paper's) on $CELEBA_DIR, each in its share of the budget left.
# Writes into $OUT (default gpu_suite_out): suite.log; suite.tgz, to unpack in the repository root (what the stages
# wrote under results/, the MNIST run's TensorBoard events in runs/gpu_suite_mnist_<row>/); and, unless the 1,000 epochs
# are done, mnist_<row>.ckpt.pt.part-aa... (<= 15 MiB each) + mnist_<row>.ckpt.pt.sha256: copy them into
# ckpt/mnist_<row>/ and carry ckpt/ to the next session. Exit 0 only if every stage that ran succeeded.
# Environment: PYTHON (default python3, the GPU machine's own: nothing is installed), TINY=1 (toy sizes on the CPU,
# results under $SCRATCH, never results/), OUT, SCRATCH (default /tmp/gpu_suite_scratch), BUDGET, MNIST_DIR (default
# data/mnist), MNIST_ROW (fixed, learned-scalar, learned, warmstart, optimal, discretized), MNIST_FLAGS (more flags for
# train_images.py, e.g. --compile whole-step), CKPT_DIR (default ckpt), CELEBA_DIR (default data/celeba), CELEBA_ROWS,
# CELEBA_EPOCHS. Relative paths are relative to the repository root.
set -u
cd "$(dirname "$0")/.." || exit
STAGES=(env nll train tests 2d mnist)  # the default; celeba runs when named
for name in "$@"; do
  [[ " ${STAGES[*]} celeba " == *" $name "* ]] ||
    { echo "gpu_suite.sh: no stage '$name'; stages: ${STAGES[*]} celeba" >&2; exit 2; }
done
WANTED=" ${*:-${STAGES[*]}} "
# Table 2's rows: train_images.py flags. warmstart: LS-VAE for 9,360 steps (20 epochs of 468), about the ~7,700 steps
# at lr 3e-4 that a learned scalar log sigma needs to fall from sigma = 1 to ~0.1 (it moves ~lr a step), then LV-VAE;
# fixed before any run.
declare -A ROWS=([fixed]="--sigma fixed" [learned-scalar]="--sigma learned-scalar" [learned]="--sigma learned"
                 [warmstart]="--sigma learned --lv-warmup 9360" [optimal]="--sigma optimal"
                 [discretized]="--sigma learned --likelihood discretized")
ROW_NAMES="fixed learned-scalar learned warmstart optimal discretized"
MNIST_ROW=${MNIST_ROW:-learned} CELEBA_ROWS=${CELEBA_ROWS:-fixed learned}
for row in $MNIST_ROW $CELEBA_ROWS; do
  [ -n "${ROWS[$row]:-}" ] || { echo "gpu_suite.sh: no Table 2 row '$row'; rows: $ROW_NAMES" >&2; exit 2; }
done
read -ra MNIST_FLAGS <<<"${MNIST_FLAGS:-}"
want() { [[ $WANTED == *" $1 "* ]]; }

PY=${PYTHON:-python3} TINY=${TINY:-0} BUDGET=${BUDGET:-540}
MNIST_DIR=${MNIST_DIR:-data/mnist} CKPT_DIR=${CKPT_DIR:-ckpt} CELEBA_DIR=${CELEBA_DIR:-data/celeba}
TAG=mnist_$MNIST_ROW  # the run's name in ckpt/, $OUT and runs/
RESERVE=25  # seconds of the budget kept for splitting the checkpoint and packing
OUT=$(realpath -m "${OUT:-gpu_suite_out}") SCRATCH=$(realpath -m "${SCRATCH:-/tmp/gpu_suite_scratch}")
LOG=$OUT/suite.log BG_LOG=$SCRATCH/2d.log EXITS=$SCRATCH/exits; STAGE_LOG=$LOG
rm -rf "$SCRATCH/runs" "$SCRATCH/runs2d" "$SCRATCH/runs_celeba" "$SCRATCH/results" "$SCRATCH/pack" \
  "$OUT"/mnist_*.ckpt.pt.*  # ours only
mkdir -p "$OUT" "$SCRATCH/pack"
: >"$LOG"; : >"$BG_LOG"; : >"$EXITS"; touch "$SCRATCH/started"  # packed: the files under $RESULTS newer than this
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # tests/conftest.py sets it where there is no GPU; here the GPU runs Triton
if [ "$TINY" = 1 ]; then  # CPU plumbing: every stage at toy sizes
  export OMP_NUM_THREADS=1  # 2d and mnist share a CI machine's 2 cores: 2 threads each would halve both
  RESULTS=$SCRATCH/results DEVICE=cpu EVAL_EVERY=1
  NLL=(--batch-sizes 8 --rep-ms 1 --warmup-ms 1 --sweep)
  TRAIN=(--sigmas learned --datasets mnist --steps 2 --warmup 1 --batch-size 8)  # --profile: 10 s more on a CPU
  TWO_D=(--steps 20 --seeds 2 --hidden 16 --lv-warmup 10 --eval-points 200 --iwae-points 50 --out "$RESULTS/2d/tiny")
  MNIST_NEW=(--max-train-images 256 --eval-images 64 --iwae-images 8 --iwae-k 2 --batch-size 32)
  CELEBA=(--max-train-images 32 --batch-size 16 --eval-images 16 --iwae-images 4 --iwae-k 2 --epochs 1)
else
  RESULTS=results DEVICE=cuda EVAL_EVERY=10
  NLL=(--batch-sizes 1024 4096 --rep-ms 50 --warmup-ms 10 --sweep)  # the table is written before the sweep
  # LV-VAE: 4 rows, 12 ablations and 3 profiles, each compiling for up to ~18 s on an H200, 2 s of timed steps a
  # row; the table is rewritten after each row, in priority order, so the time box keeps what ran
  TRAIN=(--sigmas learned --datasets mnist celeba --ablations --profile --steps 1000 --row-seconds 2 --warmup 8)
  TWO_D=(--preset paper --out "$RESULTS/2d/paper")
  MNIST_NEW=()
  CELEBA=(--epochs "${CELEBA_EPOCHS:-200}" --eval-every 50)
fi

skip() {  # skip NAME WHY
  echo "=== $1: skipped, $2" | tee -a "$STAGE_LOG"
  echo "$1 skipped" >>"$EXITS"; RC=skipped
}

stage() {  # stage NAME BOX COMMAND...: COMMAND in min(BOX, budget left) s, output to $STAGE_LOG; its exit code in RC
  local name=$1 box=$2 left=$((BUDGET - RESERVE - SECONDS)) started; shift 2
  ((box > left)) && box=$left
  ((box < 10)) && { skip "$name" "$left s of the budget left"; return; }
  echo "=== $name (time box $box s): $*" | tee -a "$STAGE_LOG"
  started=$SECONDS
  timeout -k "${GRACE:-10}" "$box" "$@" >>"$STAGE_LOG" 2>&1
  RC=$?
  echo "=== $name: exit $RC after $((SECONDS - started)) s$( ((RC == 124)) && echo ' (time box reached)')" \
    | tee -a "$STAGE_LOG"
  echo "$name $RC" >>"$EXITS"
}

two_d() {  # in the background: again without CUDA graphs if it fails before its time box (e.g. a capture error)
  STAGE_LOG=$BG_LOG
  local train_2d=("$PY" train_2d.py "${TWO_D[@]}" --device "$DEVICE" --logdir "$SCRATCH/runs2d")
  stage 2d "$BUDGET" "${train_2d[@]}"
  [[ $RC == 0 || $RC == 124 || $RC == skipped ]] || stage 2d-no-graphs "$BUDGET" "${train_2d[@]}" --cuda-graphs off
}

mnist() {  # continue the carried checkpoint, or start; then split its ckpt.pt into $OUT for the next session
  local carried=$CKPT_DIR/$TAG run=$SCRATCH/runs/$TAG box=$((BUDGET - RESERVE - SECONDS - 30)) ckpts pieces row
  local flags=(--epochs 1000 --eval-every "$EVAL_EVERY" --data-dir "$MNIST_DIR" --out "$RESULTS/images"
               --device "$DEVICE" "${MNIST_FLAGS[@]}")
  if compgen -G "$carried/*ckpt.pt.part-*" >/dev/null; then
    mkdir -p "$run"  # train_images.py writes into its checkpoint's folder: a run folder of its own
    cat "$carried"/*ckpt.pt.part-* >"$run/ckpt.pt"
    cp "$carried"/events.out.tfevents.* "$run"/ 2>/dev/null  # the earlier sessions' curves, where carried
    if [ "$(sha256sum <"$run/ckpt.pt" | cut -d' ' -f1)" != "$(cut -d' ' -f1 "$carried"/*ckpt.pt.sha256 2>/dev/null)" ]
    then
      echo "=== mnist: error: the pieces in $carried do not join to the checkpoint their sha256 names; stage failed" \
        | tee -a "$LOG"
      echo "mnist sha256" >>"$EXITS"; return
    fi
    flags+=(--resume "$run/ckpt.pt")  # the checkpoint holds the rest of the run's settings
  else
    read -ra row <<<"${ROWS[$MNIST_ROW]}"
    flags+=(--dataset mnist "${row[@]}" --logdir "$SCRATCH/runs" "${MNIST_NEW[@]}")
  fi
  [ "$TINY" = 1 ] && box=12  # stopped by its box mid-run, as on the GPU
  # The box, 30 s before the budget ends, sends SIGTERM: train_images.py finishes its step, saves an exactly
  # resumable ckpt.pt and exits 143. SIGKILL comes 60 s later, so that a save has time.
  GRACE=60 stage mnist "$box" "$PY" train_images.py "${flags[@]}"
  [ "$RC" = skipped ] && return
  mkdir -p "$SCRATCH/pack/runs/gpu_suite_$TAG"
  cp "$SCRATCH"/runs/*/events.out.tfevents.* "$SCRATCH/pack/runs/gpu_suite_$TAG/" 2>/dev/null
  if [ "$RC" = 0 ]; then
    echo "=== mnist: all 1,000 epochs done, Table 2 row in $RESULTS/images; nothing to carry: empty $carried" \
      | tee -a "$LOG"
    return
  fi
  ckpts=("$SCRATCH"/runs/*/ckpt.pt)  # one run folder: $SCRATCH/runs was emptied at the start
  if [ ! -f "${ckpts[0]}" ]; then
    echo "=== mnist: error: no ckpt.pt was saved; nothing to carry" | tee -a "$LOG"
    echo "mnist-pieces 1" >>"$EXITS"; return
  fi
  pieces=$((($(stat -c %s "${ckpts[0]}") + 15 * 2 ** 20 - 1) / (15 * 2 ** 20)))
  if ((pieces > 5)); then  # the device tool returns 8 files: suite.log, suite.tgz, the sha256 and 5 pieces
    echo "=== mnist: error: ${ckpts[0]} makes $pieces pieces of 15 MiB, more than 5; nothing to carry" | tee -a "$LOG"
    echo "mnist-pieces 1" >>"$EXITS"; return
  fi
  split -b 15M "${ckpts[0]}" "$OUT/$TAG.ckpt.pt.part-"
  echo "$(sha256sum <"${ckpts[0]}" | cut -d' ' -f1)  ckpt.pt" >"$OUT/$TAG.ckpt.pt.sha256"
  echo "=== mnist: ${ckpts[0]} in $pieces pieces, $OUT/$TAG.ckpt.pt.{part-*,sha256}: copy them into" \
    "ckpt/$TAG/ for the next session" | tee -a "$LOG"
  echo "mnist-pieces 0" >>"$EXITS"
}

celeba() {  # the CelebA rows one after the other, each in its share of the budget left; Table 2 rows when they finish
  local rows i row
  read -ra rows <<<"$CELEBA_ROWS"
  for i in "${!rows[@]}"; do
    read -ra row <<<"${ROWS[${rows[i]}]}"
    stage "celeba-${rows[i]}" $(((BUDGET - RESERVE - SECONDS) / (${#rows[@]} - i))) "$PY" train_images.py \
      --dataset celeba "${row[@]}" --data-dir "$CELEBA_DIR" "${CELEBA[@]}" --device "$DEVICE" \
      --logdir "$SCRATCH/runs_celeba" --out "$RESULTS/images"
  done
}

# --- alone on the GPU ---
want env && stage env 20 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; print(sys.version); print(\
\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", \
torch.cuda.is_available() and torch.cuda.get_device_name())'; nproc; free -g"
want nll && stage nll 90 "$PY" bench/bench_nll.py "${NLL[@]}" --out "$RESULTS/bench_nll.md"
want train && stage train 200 "$PY" bench/bench_train.py "${TRAIN[@]}" --device "$DEVICE" \
  --out "$RESULTS/bench_train.md"

# --- concurrently: no timings are taken from here on ---
if want 2d; then
  two_d & background=$!
  echo "=== 2d runs in the background, concurrently with:$(want tests && echo -n ' tests')$(want mnist &&
    echo -n ' mnist'); its log follows theirs" | tee -a "$LOG"
fi
if want tests; then
  if [ "$TINY" = 1 ]; then skip tests "TINY=1: without a GPU every test would skip"
  else stage tests 120 "$PY" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider; fi
fi
want mnist && mnist
want celeba && celeba
want 2d && { wait "$background"; cat "$BG_LOG" >>"$LOG"; }

# --- pack: what the stages wrote, with the paths it has in the repository ---
(cd "$(dirname "$RESULTS")" && find "$(basename "$RESULTS")" -type f -newer "$SCRATCH/started" \
  -exec cp --parents {} "$SCRATCH/pack" \; 2>/dev/null)
tar czf "$OUT/suite.tgz" -C "$SCRATCH/pack" -T <(ls -A "$SCRATCH/pack") 2>>"$LOG"
echo "=== packed $OUT/suite.tgz: $(tar tzf "$OUT/suite.tgz" | grep -vc /$) files, $(du -h "$OUT/suite.tgz" | cut -f1)" \
  | tee -a "$LOG"

failed=0 summary=""
while read -r name rc; do  # mnist's time box ends it by design: 124 from timeout (143 if its own SIGTERM)
  summary+=" $name=$rc"
  [[ $rc == 0 || $rc == skipped || ($name == mnist && ($rc == 124 || $rc == 143)) ]] || failed=1
done <"$EXITS"
echo "=== summary after $SECONDS s:$summary; $( ((failed)) && echo 'a stage failed' || echo 'all that ran succeeded')" \
  | tee -a "$LOG"
exit $failed
