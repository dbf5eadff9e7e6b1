#!/usr/bin/env bash
# The engines' benchmark of the repair-graph issue, run on a quiet 2-core machine: the default shipped repair
# (3 independent tasks, plain objective, 40 steps, 4 views, batch 64) at 1 and 2 threads, then the cheaper setting.
set -uo pipefail
for t in 1 2; do
  python cli.py bench --n 64 --backends torch,onnxruntime,torch-compile --threads $t \
      --json results/bench/repair_40x4_t$t.json --plot results/bench/repair_40x4_t$t.png
done
python cli.py bench --n 64 --steps 20 --views 2 --backends torch,onnxruntime --threads 1 \
    --json results/bench/repair_20x2_t1.json
