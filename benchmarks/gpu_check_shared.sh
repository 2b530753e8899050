#!/usr/bin/env bash
# The CPU dry run of the GPU check on a shared machine (issue #28): it must pass while another gq job
# trains and while a fresh clone builds its kernel.
#
#   bash benchmarks/gpu_check_shared.sh [WORK_DIR]    # default /tmp/gq_check_shared; ~3-4 minutes
#
# 1. starts `gq train tiny_cpu` (from this checkout, at the dry run's priority: nice $GQ_SHARED_TRAIN_NICE,
#    default 0) and waits until it has taken its first optimizer step;
# 2. clones this checkout (HEAD) into WORK_DIR/clone, with an empty kernel cache
#    (GQ_KERNELS_BUILD_DIR=WORK_DIR/ext), and starts that clone's first kernel build;
# 3. two seconds later runs `bash benchmarks/gpu_check.sh --cpu-dry-run` in the clone: its kernel
#    check has to wait for the build lock, beside the training;
# 4. writes WORK_DIR/gpu_check_shared.md: the load, the training's progress before and after, the
#    build, the dry run's exit status and its report; then stops the training.
# Exit status: the dry run's.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
S=${1:-/tmp/gq_check_shared}
PY=${PYTHON:-$ROOT/.venv/bin/python}
GQ=$(dirname "$PY")/gq
NICE=${GQ_SHARED_TRAIN_NICE:-0}
rm -rf "$S" && mkdir -p "$S/dry"
git clone -q "$ROOT" "$S/clone" && ln -s "$(readlink -f "$ROOT/.venv")" "$S/clone/.venv"
tail_log() { tail -c 600 "$1" 2>/dev/null | tr '\r' '\n' | grep -a "it" | tail -1; }

(cd "$ROOT" && PYTHONPATH=$ROOT exec nice -n "$NICE" "$GQ" train tiny_cpu train.steps=400 "train.output_dir=$S/train" \
  train.log_every=5 >"$S/train.log" 2>&1) &
TRAIN=$!
for _ in $(seq 120); do  # until the training has taken a step (at most 4 minutes)
  tr '\r' '\n' <"$S/train.log" 2>/dev/null | grep -aqE "\| +[1-9][0-9]*/400" && break
  sleep 2
done
export GQ_KERNELS_BUILD_DIR=$S/ext  # the fresh clone's kernel cache: empty, as on a fresh machine
(cd "$S/clone" && PYTHONPATH=$S/clone exec "$PY" -c "import time; t = time.time(); from gq_plugin.search import kernels; \
ok = kernels.load_cpu() is not None; print(f'fresh clone kernel built: {ok} in {time.time() - t:.1f} s')" >"$S/build.log" 2>&1) &
BUILD=$!
sleep 2
before_train=$(tail_log "$S/train.log")
before_load=$(cut -d' ' -f1-3 /proc/loadavg)
build_alive=$(kill -0 $BUILD 2>/dev/null && echo yes || echo no)
t0=$(date +%s)
(cd "$S/clone" && PYTHON=$PY bash benchmarks/gpu_check.sh --cpu-dry-run --out-dir "$S/dry" >"$S/dry.log" 2>&1)
rc=$?
t1=$(date +%s)
after_train=$(tail_log "$S/train.log")
after_load=$(cut -d' ' -f1-3 /proc/loadavg)
train_alive=$(kill -0 $TRAIN 2>/dev/null && echo yes || echo no)
wait $BUILD
kill $TRAIN 2>/dev/null
wait $TRAIN 2>/dev/null
{
  echo "## gpu_check.sh --cpu-dry-run on a shared machine (issue #28)"
  echo
  echo "Command: \`bash benchmarks/gpu_check_shared.sh\` at $(git -C "$ROOT" rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC');"
  echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), shared with other jobs."
  echo
  echo "* dry run: **exit status $rc** in $((t1 - t0)) s; load average $before_load at the start, $after_load at the end"
  echo "* beside it, \`gq train tiny_cpu\` (nice $NICE) was training (alive at the end: $train_alive):"
  echo "  before: \`$before_train\`"
  echo "  after: \`$after_train\`"
  echo "* and a fresh clone's first kernel build (running when the dry run started: $build_alive): $(tail -1 "$S/build.log")"
  echo
  echo "Dry run's own lines:"
  echo
  echo '```'
  grep -aE '^\[gpu_check\]|^gq_plugin: wait' "$S/dry.log"
  echo '```'
  echo
  sed 's/^## /### /; s/^### \([0-9]\)/#### \1/' "$S/dry/gpu_check.md"
} >"$S/gpu_check_shared.md"
cat "$S/gpu_check_shared.md"
exit $rc
