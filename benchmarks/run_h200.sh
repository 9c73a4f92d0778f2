#!/usr/bin/env bash
# One device call on the H200: unpack the carried wheels (.device/site.tgz, see
# ../shared/unsloth-on-h200.md), install loraburst, then run the real-path comparisons and the
# planner's per-architecture check within a time budget. Results land in benchmarks/results/
# and are copied to $OUT when it is set.
#   [REAL_PATH_ARGS="--rerun --call X"] bash benchmarks/run_h200.sh "a/ours,d/unsloth" 480 "gemma-2-9b,phi-3-mini" 150 [calibration budget s]
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/site && tar -C /tmp/site -xzf .device/site.tgz
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/lb . >/tmp/pip.log 2>&1 \
  || { tail -20 /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:/tmp/lb:$PWD
runs=${1:-}; budget=${2:-480}; archs=${3:-}; arch_budget=${4:-0}; calib_budget=${5:-0}
# The hand-written elementwise kernels checked against eager first (in a cache folder of their
# own, so the runs below still start cold); on a mismatch the runs use torch.compile instead.
if [ -n "$runs" ]; then
  TRITON_CACHE_DIR=$(mktemp -d) timeout 90 python3 benchmarks/triton_ops_h200.py --check \
    > "${OUT:-/tmp}/triton_check.log" 2>&1 \
    || { echo "triton kernels failed their check: runs use torch.compile"; tail -5 "${OUT:-/tmp}/triton_check.log";
         export LORABURST_ELEMENTWISE=compile; }
fi
if [ -n "$runs" ]; then
  # The chunked loss's bytes per logits element, which the planner plans with (~15 s).
  timeout 60 python3 benchmarks/loss_memory_h200.py > "${OUT:-/tmp}/loss_memory.log" 2>&1
  [ -n "${OUT:-}" ] && cp benchmarks/results/loss_memory.json "$OUT"/ 2>/dev/null
  python3 benchmarks/real_path.py --only "$runs" --budget-s "$budget" ${REAL_PATH_ARGS:-} 2>&1 | tee "${OUT:-/tmp}/real.log" | tail -25
  [ -n "${OUT:-}" ] && cp benchmarks/results/real_path.json "$OUT"/
fi
if [ -n "$archs" ] && [ "$arch_budget" -gt 0 ]; then
  timeout "$arch_budget" python3 benchmarks/planner_accuracy.py --only "$archs" 2>&1 | tee "${OUT:-/tmp}/planner.log" | tail -12
fi
if [ "$calib_budget" -gt 0 ]; then
  python3 benchmarks/calibrate_real_path.py --budget-s "$calib_budget" --cleanup 2>&1 | tee "${OUT:-/tmp}/calib.log" | tail -20
  [ -n "${OUT:-}" ] && cp benchmarks/results/real_path_calibration.json "$OUT"/
fi
if [ -n "${OUT:-}" ]; then cp benchmarks/results/real_path.json benchmarks/results/planner_accuracy.json "$OUT"/ 2>/dev/null; fi
true
