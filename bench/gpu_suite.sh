#!/usr/bin/env bash
# The one command that spends a lent GPU's minutes (15 a session, ~12 usable, 10 a command): time-boxed stages within
# one budget of $BUDGET s (default 540); each stage is logged; one that fails or runs out of time never stops the next.
#
#   bash bench/gpu_suite.sh [STAGE ...]      # on the GPU machine: stages env nll train tests 2d celeba mnist (all)
#   PYTHON=.venv/bin/python TINY=1 MNIST_DIR=<MNIST-format IDX files> bash bench/gpu_suite.sh   # CPU plumbing, ~25 s
#
# In order, alone on the GPU so that their timings are honest: env (nvidia-smi, versions; 20 s), nll (bench/bench_nll.py
# and its launch-configuration sweep, 90 s; then nll-host, bench/bench_nll_host.py, 20 s), train (bench/bench_train.py,
# ablations and profile; 200 s). Then, concurrently until the budget ends: 2d (train_2d.py --preset paper) and celeba
# (the CelebA rows of Table 2, $CELEBA_ROWS, default "fixed learned", the paper's two, side by side for $CELEBA_EPOCHS,
# default 200, the paper's, on $CELEBA_DIR) in the background, beside tests (pytest -m gpu; 150 s) and then mnist: the
# MNIST rows of Table 2 in $MNIST_ROW (default learned: LV-VAE; several run one after the other) toward the paper's
# 1,000 epochs, each continued from $CKPT_DIR/mnist_<row>/ (an earlier session's checkpoint pieces) where carried. A row
# that the budget stops saves a checkpoint, which comes back in pieces, and the rows after it wait for the next session.
# celeba and mnist are skipped, as no failure, when their data are not there and the stage was not named: carry
# data/celeba or data/mnist (the device tool's 64 MiB hold one of them beside the tracked files).
# Writes into $OUT (default gpu_suite_out): suite.log; suite.tgz, for bench/unpack_suite.py (never a plain tar xzf:
# a later call's runs.jsonl lacks an earlier call's records) to unpack in the repository root (what the stages
# wrote under results/, the runs' TensorBoard events in runs/gpu_suite_<dataset>_<row>/); and, for a row stopped
# before its 1,000 epochs, mnist_<row>.ckpt.pt.part-aa... (<= 15 MiB each) + mnist_<row>.ckpt.pt.sha256: copy them
# into ckpt/mnist_<row>/ and carry ckpt/ to the next session. Exit 0 only if every stage that ran succeeded.
# Environment: PYTHON (default python3, the GPU machine's own: nothing is installed), TINY=1 (toy sizes on the CPU,
# results under $SCRATCH, never results/), OUT, SCRATCH (default /tmp/gpu_suite_scratch), BUDGET, MNIST_DIR (default
# data/mnist), MNIST_ROW (one or more of fixed, learned-scalar, learned, warmstart, warmstart-optimal, optimal,
# discretized), MNIST_EPOCHS (default 1000), MNIST_FLAGS (more flags for train_images.py, e.g. --eval-every 50),
# MNIST_MIN_BOX (s; default 0: a row starts only with at least this much of the budget left, for when a stopped row's
# checkpoint could not be carried), CKPT_DIR (default ckpt), CELEBA_DIR (default data/celeba), CELEBA_PARTS (folders
# that together hold CelebA's images and partition file, carried one a call; joined instead of CELEBA_DIR),
# CELEBA_ROWS, CELEBA_EPOCHS, CELEBA_EXTRA (a second folder of training faces in the CelebA folder, passed as
# --celeba-extra-train, e.g. img_align_celeba_89x109; default none), CELEBA_FLAGS (more flags for the CelebA rows, e.g.
# --valid-images 780: early stopping on the offline copy's validation faces). Relative paths are relative to the
# repository root.
set -u
cd "$(dirname "$0")/.." || exit
STAGES=(env nll train tests 2d celeba mnist)
for name in "$@"; do
  [[ " ${STAGES[*]} " == *" $name "* ]] || { echo "gpu_suite.sh: no stage '$name'; stages: ${STAGES[*]}" >&2; exit 2; }
done
WANTED=" ${*:-${STAGES[*]}} " NAMED=" $* "
# Table 2's rows: train_images.py flags. warmstart: LS-VAE for 9,360 steps (20 epochs of 468), about the ~7,700 steps
# at lr 3e-4 that a learned scalar log sigma needs to fall from sigma = 1 to ~0.1 (it moves ~lr a step), then LV-VAE;
# fixed before any run. A count of steps for that reason: at Table 2's batch 512 (117 steps an epoch), 80 epochs.
# warmstart-optimal: the same 9,360 steps as sigma-VAE (--lv-warmup-sigma optimal), so that the two warm starts
# differ only in the warm phase's sigma; chosen before its MNIST CPU runs finished.
# Both are MNIST's: on the 4,569 offline CelebA faces alone (35 steps an epoch) 9,360 steps outlast 200 epochs, and
# train_images.py warns that the head would never train; with CELEBA_EXTRA's 9,714 more (111 steps) it hands over at
# epoch 85 of 200, a length chosen for MNIST, not for faces.
declare -A ROWS=([fixed]="--sigma fixed" [learned-scalar]="--sigma learned-scalar" [learned]="--sigma learned"
                 [warmstart]="--sigma learned --lv-warmup 9360" [optimal]="--sigma optimal"
                 [warmstart-optimal]="--sigma learned --lv-warmup 9360 --lv-warmup-sigma optimal"
                 [discretized]="--sigma learned --likelihood discretized")
ROW_NAMES="fixed learned-scalar learned warmstart warmstart-optimal optimal discretized"
MNIST_ROW=${MNIST_ROW:-learned} CELEBA_ROWS=${CELEBA_ROWS:-fixed learned}
for row in $MNIST_ROW $CELEBA_ROWS; do
  [ -n "${ROWS[$row]:-}" ] || { echo "gpu_suite.sh: no Table 2 row '$row'; rows: $ROW_NAMES" >&2; exit 2; }
done
read -ra MNIST_FLAGS <<<"${MNIST_FLAGS:-}"
read -ra CELEBA_FLAGS <<<"${CELEBA_FLAGS:-}"
want() { [[ $WANTED == *" $1 "* ]]; }
named() { [[ $NAMED == *" $1 "* ]]; }

PY=${PYTHON:-python3} TINY=${TINY:-0} BUDGET=${BUDGET:-540} MNIST_EPOCHS=${MNIST_EPOCHS:-1000}
MNIST_DIR=${MNIST_DIR:-data/mnist} CKPT_DIR=${CKPT_DIR:-ckpt} CELEBA_DIR=${CELEBA_DIR:-data/celeba}
RESERVE=25  # seconds of the budget kept for splitting the checkpoint and packing
OUT=$(realpath -m "${OUT:-gpu_suite_out}") SCRATCH=$(realpath -m "${SCRATCH:-/tmp/gpu_suite_scratch}")
LOG=$OUT/suite.log EXITS=$SCRATCH/exits; STAGE_LOG=$LOG
rm -rf "$SCRATCH/runs" "$SCRATCH/results" "$SCRATCH/pack" "$SCRATCH/logs" "$OUT"/mnist_*.ckpt.pt.*  # ours only
mkdir -p "$OUT" "$SCRATCH/pack" "$SCRATCH/logs"
: >"$LOG"; : >"$EXITS"; touch "$SCRATCH/started"  # packed: the files under $RESULTS newer than this
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # tests/conftest.py sets it where there is no GPU; here the GPU runs Triton
if [ "$TINY" = 1 ]; then  # CPU plumbing: every stage at toy sizes
  export OMP_NUM_THREADS=1  # the concurrent stages share a CI machine's 2 cores: 2 threads each would halve them
  RESULTS=$SCRATCH/results DEVICE=cpu EVAL_EVERY=1
  NLL=(--batch-sizes 8 --rep-ms 1 --warmup-ms 1 --sweep) HOST=(--calls 20 --rounds 2)
  TRAIN=(--sigmas learned --datasets mnist --steps 2 --warmup 1 --batch-size 8)  # --profile: 10 s more on a CPU
  TWO_D=(--steps 20 --seeds 2 --hidden 16 --lv-warmup 10 --eval-points 200 --iwae-points 50 --out "$RESULTS/2d/tiny")
  MNIST_NEW=(--max-train-images 256 --eval-images 64 --iwae-images 8 --iwae-k 2 --batch-size 32)
  CELEBA=(--max-train-images 32 --batch-size 16 --eval-images 16 --iwae-images 4 --iwae-k 2 --epochs 1)
else
  RESULTS=results DEVICE=cuda EVAL_EVERY=25
  NLL=(--batch-sizes 1024 4096 --rep-ms 50 --warmup-ms 10 --sweep)  # the table is written before the sweep
  HOST=()  # bench_nll_host.py's defaults: 7 rounds of 2,000 calls, ~5 s
  # LV-VAE: 4 rows, 12 ablations and 3 profiles, each compiling for up to ~18 s on an H200, 2 s of timed steps a
  # row; the table is rewritten after each row, in priority order, so the time box keeps what ran
  TRAIN=(--sigmas learned --datasets mnist celeba --ablations --profile --steps 1000 --row-seconds 2 --warmup 8)
  TWO_D=(--preset paper --out "$RESULTS/2d/paper")
  # --iwae-k 1000: the literature's practice (k = 1,000 to 5,000); 1 M decoder passes at the end. Batch 512: the rule
  # of bench/NOTES.md (whole-step at 512 gave 2.85x the images/s of 128 on an H200, 2026-11-28), every MNIST row
  MNIST_NEW=(--iwae-k 1000 --batch-size 512)
  CELEBA=(--epochs "${CELEBA_EPOCHS:-200}" --eval-every 50)
fi
[ -n "${CELEBA_EXTRA:-}" ] && CELEBA+=(--celeba-extra-train "$CELEBA_EXTRA")
CELEBA+=("${CELEBA_FLAGS[@]}")

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

has_data() {  # has_data STAGE WHAT FILE...: true if every FILE exists; else the stage is skipped, or fails if named
  local name=$1 what=$2 path; shift 2
  for path in "$@"; do
    [ -e "$path" ] && continue
    if named "$name"; then
      echo "=== $name: error: no $path; carry $what to the device$([[ $what != *" "* ]] &&
        echo " (e.g. carry=[\"$what\"])")" | tee -a "$LOG"
      echo "$name no-data" >>"$EXITS"
    else
      skip "$name" "no $path (carry $what to run it)"
    fi
    return 1
  done
}

pack_events() {  # pack_events FOLDER NAME: FOLDER's TensorBoard events into the pack's runs/NAME/
  mkdir -p "$SCRATCH/pack/runs/$2"
  find "$1" -name 'events.out.tfevents.*' -exec cp {} "$SCRATCH/pack/runs/$2/" \; 2>/dev/null
}

pack() {  # suite.tgz: what the stages wrote under results/ so far, with its paths in the repository, and the events.
  # Rewritten after every MNIST row and at the end, through a temporary file, so that a call the device tool cuts
  # short still brings back the rows that finished before it.
  (cd "$(dirname "$RESULTS")" && find "$(basename "$RESULTS")" -type f -newer "$SCRATCH/started" \
    -exec cp --parents {} "$SCRATCH/pack" \; 2>/dev/null)
  tar czf "$OUT/suite.tgz.tmp" -C "$SCRATCH/pack" -T <(ls -A "$SCRATCH/pack") 2>>"$LOG" &&
    mv "$OUT/suite.tgz.tmp" "$OUT/suite.tgz"
  echo "=== packed $OUT/suite.tgz: $(tar tzf "$OUT/suite.tgz" | grep -vc /$) files, $(du -h "$OUT/suite.tgz" | cut -f1)" \
    | tee -a "$LOG"
}

two_d() {  # in the background: again without CUDA graphs if it fails before its time box (e.g. a capture error)
  # The box ends 45 s early with SIGTERM: train_2d.py stops training, evaluates what it trained and writes Table 1
  # marked as cut short, within the 45 s before SIGKILL.
  STAGE_LOG=$SCRATCH/logs/2d.log
  local train_2d=("$PY" train_2d.py "${TWO_D[@]}" --device "$DEVICE" --logdir "$SCRATCH/runs/2d")
  GRACE=45 stage 2d $((BUDGET - RESERVE - SECONDS - 45)) "${train_2d[@]}"
  [[ $RC == 0 || $RC == 124 || $RC == skipped ]] ||
    GRACE=45 stage 2d-no-graphs $((BUDGET - RESERVE - SECONDS - 45)) "${train_2d[@]}" --cuda-graphs off
}

celeba() {  # in the background: the rows side by side (short runs, mostly compilation); Table 2 rows at the end.
  # The decoded cache goes to $SCRATCH: the data folder stays as carried (with a cache it would pass the 64 MiB).
  local name row
  for name in $CELEBA_ROWS; do
    read -ra row <<<"${ROWS[$name]}"
    STAGE_LOG=$SCRATCH/logs/celeba-$name.log stage "celeba-$name" "$BUDGET" "$PY" train_images.py --dataset celeba \
      "${row[@]}" --data-dir "$CELEBA_DIR" --cache-dir "$SCRATCH/celeba_cache" "${CELEBA[@]}" --device "$DEVICE" \
      --logdir "$SCRATCH/runs/celeba_$name" --out "$RESULTS/images" &
  done
  wait
  for name in $CELEBA_ROWS; do pack_events "$SCRATCH/runs/celeba_$name" "gpu_suite_celeba_$name"; done
}

mnist_row() {  # mnist_row ROW: continue the carried checkpoint, or start; if the box stops it, split its ckpt.pt
  local tag=mnist_$1 carried=$CKPT_DIR/mnist_$1 logdir=$SCRATCH/runs/mnist_$1 ckpts pieces row
  local box=$((BUDGET - RESERVE - SECONDS - 30))
  local flags=(--epochs "$MNIST_EPOCHS" --eval-every "$EVAL_EVERY" --data-dir "$MNIST_DIR" --out "$RESULTS/images"
               --device "$DEVICE" "${MNIST_FLAGS[@]}")
  if compgen -G "$carried/*ckpt.pt.part-*" >/dev/null; then
    mkdir -p "$logdir/carried"  # train_images.py writes into its checkpoint's folder: a run folder of its own
    cat "$carried"/*ckpt.pt.part-* >"$logdir/carried/ckpt.pt"
    cp "$carried"/events.out.tfevents.* "$logdir/carried/" 2>/dev/null  # the earlier sessions' curves, if carried
    if [ "$(sha256sum <"$logdir/carried/ckpt.pt" | cut -d' ' -f1)" != \
         "$(cut -d' ' -f1 "$carried"/*ckpt.pt.sha256 2>/dev/null)" ]; then
      echo "=== $tag: error: the pieces in $carried do not join to the checkpoint their sha256 names; stage failed" \
        | tee -a "$LOG"
      echo "$tag sha256" >>"$EXITS"; RC=sha256; return
    fi
    flags+=(--resume "$logdir/carried/ckpt.pt")  # the checkpoint holds the rest of the run's settings
  else
    read -ra row <<<"${ROWS[$1]}"
    flags+=(--dataset mnist "${row[@]}" --logdir "$logdir" "${MNIST_NEW[@]}")
  fi
  [ "$TINY" = 1 ] && ((MNIST_EPOCHS > 1)) && box=12  # stopped by its box mid-run, as on the GPU
  # The box, 30 s before the budget ends, sends SIGTERM: train_images.py finishes its step, saves an exactly
  # resumable ckpt.pt and exits 143. SIGKILL comes 60 s later, so that a save has time.
  GRACE=60 stage "$tag" "$box" "$PY" train_images.py "${flags[@]}"
  [ "$RC" = skipped ] && return
  pack_events "$logdir" "gpu_suite_$tag"
  if [ "$RC" = 0 ]; then
    echo "=== $tag: all $MNIST_EPOCHS epochs done, Table 2 row in $RESULTS/images; nothing to carry: empty $carried" \
      | tee -a "$LOG"
    return
  fi
  [[ $RC == 124 || $RC == 143 ]] || return  # failed: its log says why; nothing is carried
  ckpts=("$logdir"/*/ckpt.pt)  # one run folder: $SCRATCH/runs was emptied at the start
  if [ ! -f "${ckpts[0]}" ]; then
    echo "=== $tag: error: no ckpt.pt was saved; nothing to carry" | tee -a "$LOG"
    echo "$tag-pieces 1" >>"$EXITS"; return
  fi
  pieces=$((($(stat -c %s "${ckpts[0]}") + 15 * 2 ** 20 - 1) / (15 * 2 ** 20)))
  if ((pieces > 5)); then  # the device tool returns 8 files: suite.log, suite.tgz, the sha256 and 5 pieces
    echo "=== $tag: error: ${ckpts[0]} makes $pieces pieces of 15 MiB, more than 5; nothing to carry" | tee -a "$LOG"
    echo "$tag-pieces 1" >>"$EXITS"; return
  fi
  split -b 15M "${ckpts[0]}" "$OUT/$tag.ckpt.pt.part-"
  echo "$(sha256sum <"${ckpts[0]}" | cut -d' ' -f1)  ckpt.pt" >"$OUT/$tag.ckpt.pt.sha256"
  echo "=== $tag: ${ckpts[0]} in $pieces pieces, $OUT/$tag.ckpt.pt.{part-*,sha256}: copy them into ckpt/$tag/ for" \
    "the next session" | tee -a "$LOG"
  echo "$tag-pieces 0" >>"$EXITS"
}

mnist() {  # the rows one after the other; one the budget stopped is carried, and the rows after it wait
  local name stopped="" left
  for name in $MNIST_ROW; do
    if [ -n "$stopped" ]; then skip "mnist_$name" "the budget stopped mnist_$stopped before it"; continue; fi
    left=$((BUDGET - RESERVE - SECONDS - 30))
    if ((left < ${MNIST_MIN_BOX:-0})); then  # a row that cannot finish here need not start (see MNIST_MIN_BOX)
      skip "mnist_$name" "$left s left, below MNIST_MIN_BOX=$MNIST_MIN_BOX"; continue
    fi
    mnist_row "$name"
    [ "$RC" = 0 ] && pack  # a finished row comes back even if a later one is cut short
    [[ $RC == 124 || $RC == 143 ]] && stopped=$name
  done
}

# --- alone on the GPU ---
want env && stage env 20 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; print(sys.version); print(\
\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", \
torch.cuda.is_available() and torch.cuda.get_device_name())'; nproc; free -g"
want nll && stage nll 90 "$PY" bench/bench_nll.py "${NLL[@]}" --out "$RESULTS/bench_nll.md"
want nll && stage nll-host 45 "$PY" bench/bench_nll_host.py "${HOST[@]}" --device "$DEVICE" \
  --out "$RESULTS/bench_nll_host_$DEVICE.md"
want train && stage train 200 "$PY" bench/bench_train.py "${TRAIN[@]}" --device "$DEVICE" \
  --out "$RESULTS/bench_train.md"

# --- concurrently: no timings are taken from here on ---
background=() names=""
if want 2d; then two_d & background+=($!) names+=" 2d"; fi
if want celeba && [ -n "${CELEBA_PARTS:-}" ]; then  # carried in parts, one a call (README): joined by links
  CELEBA_DIR=$SCRATCH/celeba_joined
  rm -rf "$CELEBA_DIR"; mkdir -p "$CELEBA_DIR"
  for part in $CELEBA_PARTS; do
    has_data celeba "$part" "$part" || { CELEBA_DIR=""; break; }
    for folder in "$part"/img_align_celeba*/; do  # the full-size faces, and any folder of smaller ones
      [ -d "$folder" ] || continue
      mkdir -p "$CELEBA_DIR/$(basename "$folder")"
      find "$(realpath "$folder")" -name '*.jpg' -exec ln -s -t "$CELEBA_DIR/$(basename "$folder")" {} +
    done
    [ -f "$part/list_eval_partition.txt" ] && ln -s "$(realpath "$part")/list_eval_partition.txt" "$CELEBA_DIR/"
  done
  if [ -n "$CELEBA_DIR" ] && [ -n "${CELEBA_EXTRA:-}" ]; then  # the second pool's folder is in no part
    has_data celeba "the part that holds $CELEBA_EXTRA/, named in CELEBA_PARTS," "$CELEBA_DIR/$CELEBA_EXTRA" ||
      CELEBA_DIR=""
  fi
  [ -n "$CELEBA_DIR" ] && echo "=== celeba: joined $CELEBA_PARTS:$(for folder in "$CELEBA_DIR"/*/; do
    echo -n " $(find "$folder" -name '*.jpg' | wc -l) images in $(basename "$folder")"; done)" | tee -a "$LOG"
fi
if want celeba && [ -n "$CELEBA_DIR" ] &&
   has_data celeba "$CELEBA_DIR" "$CELEBA_DIR/img_align_celeba" "$CELEBA_DIR/list_eval_partition.txt" \
     ${CELEBA_EXTRA:+"$CELEBA_DIR/$CELEBA_EXTRA"}
then celeba & background+=($!) names+=" celeba"; fi
[ -n "$names" ] && echo "=== in the background:$names; their logs follow the others" | tee -a "$LOG"
if want tests; then
  if [ "$TINY" = 1 ]; then skip tests "TINY=1: without a GPU every test would skip"
  else stage tests 150 "$PY" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider; fi
fi
want mnist && has_data mnist "$MNIST_DIR" "$MNIST_DIR" && mnist
((${#background[@]})) && wait "${background[@]}"
for log in 2d $(for name in $CELEBA_ROWS; do echo "celeba-$name"; done); do
  [ -f "$SCRATCH/logs/$log.log" ] && cat "$SCRATCH/logs/$log.log" >>"$LOG"
done

# --- pack what was written, once more at the end ---
pack

failed=0 summary=""
while read -r name rc; do  # an MNIST row's time box ends it by design: 124 from timeout (143 if its own SIGTERM)
  summary+=" $name=$rc"
  [[ $rc == 0 || $rc == skipped || ($name == mnist_* && ($rc == 124 || $rc == 143)) ]] || failed=1
done <"$EXITS"
echo "=== summary after $SECONDS s:$summary; $( ((failed)) && echo 'a stage failed' || echo 'all that ran succeeded')" \
  | tee -a "$LOG"
exit $failed
