#!/usr/bin/env bash
# Accuracy of the early exit and parity of the onnxruntime engine on 1,000 PGD-20 test images (ε 8/255, the shipped
# classifier), default repair of `cli.py repair`. Speed is not measured here (run_bench_exit.sh does, quietly).
set -uo pipefail
D=${RUNS:-/tmp/parity_exit}
python cli.py attack --output $D/attacked --n 1000
OMP_NUM_THREADS=1 python cli.py repair --input $D/attacked --output $D/torch_exit --backend torch --threads 1 --quiet
OMP_NUM_THREADS=1 python cli.py repair --input $D/attacked --output $D/ort_exit --backend onnxruntime --threads 1 --quiet
python -m bench.compare_reports $D/torch_exit $D/ort_exit --labels $D/attacked/labels.csv \
    --json results/bench/parity_exit_pgd_n1000.json
