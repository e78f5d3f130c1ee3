#!/usr/bin/env bash
# Every GPU benchmark in one go, as a lent GPU machine runs it (make bench-all PY=python3): the kernel tests compiled
# for the GPU, then make bench (ours and eager; torch.compile last, as its compiles take minutes), make bench-unlearn
# and make bench-eval on random 7B-shaped weights. Each step has its own time limit, so one that hangs leaves the
# others' numbers, and each step's output goes to RUNS_DIR/bench/<step>.log as it runs (the benches' JSON records:
# the last line of each log, and RUNS_DIR/bench/bench_eval.json). About 11 minutes at most.
#   PY=python3 bash benches/run_all.sh RUNS_DIR
set -u
RUNS=${1:-runs}
LOGS=$RUNS/bench
PY=${PY:-python3}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS MAKE_COMMAND PLAIN_COMMAND: the make target (or, where there is no make, its command)
  local name=$1 secs=$2 cmd=$3
  command -v make >/dev/null || cmd=$4
  echo "=== $name (limit ${secs} s) $(date -u +%FT%TZ): $cmd"
  local t0=$SECONDS
  timeout --kill-after=5 "$secs" bash -c "$cmd" 2>&1 | tee "$LOGS/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton",
triton.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  echo "make: $(command -v make || echo 'none (the steps run the targets commands directly)')"
} 2>&1 | tee "$LOGS/env.log"

EVAL="-m benches.eval_speed --model data/toy/model --data data/toy --tasks toy_hazard,toy_general --limit 200"
step kernel-tests 90 "$PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py" \
  "$PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py"
step bench 150 "make --no-print-directory bench PY=$PY BENCH_FLAGS='--impls ours,eager'" \
  "$PY -m benches.kernels --impls ours,eager"
step bench-unlearn 180 "make --no-print-directory bench-unlearn PY=$PY" "$PY -m benches.unlearn_step && $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m benches.npo_step"
step bench-eval 150 "make --no-print-directory bench-eval PY=$PY SHAPE=zephyr-7b LIMIT=200 OUT=$RUNS" \
  "$PY $EVAL --random-shape zephyr-7b --out $LOGS/bench_eval.json"
step bench-compile 100 "make --no-print-directory bench PY=$PY BENCH_FLAGS='--impls compile'" \
  "$PY -m benches.kernels --impls compile"
