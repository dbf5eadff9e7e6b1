#!/usr/bin/env bash
# The engines' benchmark with the early exit, on a quiet 2-core machine: the default repair of `cli.py repair`
# (3 independent tasks, clean-level objective, 40 steps, 4 views, batch 64), each engine with and without the exit,
# at 1 and 2 threads; speed-ups are against torch eager without the exit. Then the accuracy and parity checks on
# 1,000 PGD-20 images (attacked once, repaired by each engine from the same 8-bit PNGs).
set -uo pipefail
for t in 1 2; do
  python cli.py bench --n 64 --backends torch,torch+exit,onnxruntime,onnxruntime+exit,torch-compile --threads $t \
      --latency-images 16 --json results/bench/exit_40x4_t$t.json --plot results/bench/exit_40x4_t$t.png
done
