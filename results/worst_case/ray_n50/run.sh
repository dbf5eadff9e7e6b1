#!/usr/bin/env bash
# #43's measurement: one worst-case table (n = 50, the probe's lowest budgets) in one process, then with --ray on two
# 1-CPU workers of a local cluster, on the quiet 2-core machine; each into fresh stages, timed by `time`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export CIFAR10_ROOT="${CIFAR10_ROOT:-$(cd .. && pwd)/shared/data/cifar10}"
OUT=results/worst_case/ray_n50
TABLE=(--n 50 --chunk 25 --survivors --iterations 20 --eot 1 --square-queries 200 --threads 1 --quiet)
/usr/bin/time -f "one process: %e s wall" python cli.py worst-case "${TABLE[@]}" --stages "$OUT/one_process/stages" \
  --json "$OUT/one_process.json" > "$OUT/one_process.md"
/usr/bin/time -f "ray, two 1-CPU workers: %e s wall" python cli.py worst-case "${TABLE[@]}" --ray --worker-cpus 1 \
  --stages "$OUT/ray/stages" --json "$OUT/ray.json" > "$OUT/ray.md"
