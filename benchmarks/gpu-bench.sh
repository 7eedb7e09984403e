#!/usr/bin/env bash
# Advance a `vptune bench` on a CUDA machine, resumably: one `vptune bench` process per task, all at once (at the cpu
# budget's 56x56 a step is launch-bound, so one process leaves the GPU mostly idle). Runs already finished under
# RESULTS (the JSON committed by an earlier machine) are copied in first and skipped; every finished run's JSON goes
# into OUT/results.tgz every 20 s, so a call cut off at its time limit keeps what finished. Unpack it into RESULTS
# and commit: the next machine continues from there.
#
#   benchmarks/gpu-bench.sh OUT                     # from the repository root, with the data and weights in place
#   tar xzf OUT/results.tgz -C "$RESULTS" --strip-components=2 --wildcards './*/*/*/runs/*.json'   # then commit
#   env: BUDGET (cpu), METHODS (linear,vpt-shallow,vpt-deep,full), SEEDS (3), TASKS (the 9-task suite),
#        RESULTS (results/bench-gpu-cpu3), PYTHON (python3), LIMIT (seconds per task process, 480),
#        SPLIT (1: processes per task, its methods dealt round robin), TIMM (1: also run tests/test_timm.py beside
#        the bench, where timm imports)
#   the data and weights travel in parts of at most 64 MiB (the weights split with `split -b`): see docs/benchmarks.md
#   the designs of issue 19 (about 315 runs; 180 took under 4 min 45 s on an H200 with SPLIT=1):
#   SPLIT=2 METHODS=vpt-deep+kv,vpt-deep+fourier,vpt-deep+tokens,vpt-deep+scaled-tokens,vpt-deep+kv+fourier+tokens,vpt-deep+kv+fourier,\
#     vpt-deep+kv+tokens,vpt-deep+fourier+tokens benchmarks/gpu-bench.sh OUT
#   a dry run on a CPU:
#   PYTHON=.venv/bin/python VPTUNE_DATA=../shared/data BUDGET=smoke SEEDS=1 TASKS=retinamnist TIMM=0 \
#     benchmarks/gpu-bench.sh runs/dry
set -uo pipefail
out=${1:?usage: benchmarks/gpu-bench.sh OUT}
budget=${BUDGET:-cpu} methods=${METHODS:-linear,vpt-shallow,vpt-deep,full} seeds=${SEEDS:-3}
tasks=${TASKS:-caltech101,cifar10,signdigits,flowers12,eurosat,retinamnist,dsprites_loc,dsprites_ori,coil20_pose}
results=${RESULTS:-results/bench-gpu-cpu3} limit=${LIMIT:-480}
work=${WORK:-/tmp/vptune-bench} py=${PYTHON:-python3}
mkdir -p "$out" "$work/logs"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$py" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__,
    'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  echo "bench: budget $budget, methods $methods, seeds $seeds, tasks $tasks, limit ${limit}s per task"
} 2>&1 | tee "$out/env.txt"

pack() {  # every finished run's JSON, the cells' sweep.json and the logs (WORK/TASK-G/TASK/METHOD/runs/ID.json)
  local list
  list=$(cd "$work" && find . \( -path './*/*/*/runs/*.json' -o -path './*/*/*/sweep.json' \) | sort)
  tar czf "$out/results.tgz.tmp" -C "$work" logs $list 2>/dev/null && mv "$out/results.tgz.tmp" "$out/results.tgz"
}

if [ "${TIMM:-1}" = 1 ] && "$py" -c "import timm" 2>/dev/null; then
  timeout "${TIMM_TIMEOUT:-300}" "$py" -m pytest -q -p no:cacheprovider tests/test_timm.py >"$out/timm.txt" 2>&1 &
fi

# SPLIT=k: each task's methods go to k processes (round robin), for more processes than tasks
IFS=, read -ra all <<<"$methods"
split=${SPLIT:-1}
for task in ${tasks//,/ }; do
  for ((g = 0; g < split; g++)); do
    group=$(for ((i = g; i < ${#all[@]}; i += split)); do printf '%s,' "${all[i]}"; done)
    [ -n "$group" ] || continue
    dir=$work/$task-$g
    if [ -d "$results/$task" ]; then  # resume: this task's finished runs, as an earlier machine left them
      mkdir -p "$dir/$task" && cp -r "$results/$task/." "$dir/$task/"
    fi
    timeout "$limit" "$py" -m vptune.cli bench --budget "$budget" --methods "${group%,}" --seeds "$seeds" \
      --tasks "$task" --out "$dir" --no-progress >"$work/logs/$task-$g.txt" 2>&1 &
  done
done
while [ -n "$(jobs -rp)" ]; do
  sleep 20
  pack
  echo "$(date +%T) runs finished: $(cd "$work" && find . -path './*/*/*/runs/*.json' | wc -l)" | tee -a "$out/env.txt"
done
pack
tail -n 3 "$work"/logs/*.txt >>"$out/env.txt"
echo "done $(date -u +%FT%TZ)" | tee -a "$out/env.txt"
