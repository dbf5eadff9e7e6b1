#!/usr/bin/env bash
# Issue-11 measurements of the second joint-standard (SSL inputs noised too, σ 0.1), in the order that matters:
# calibration, signal, then the repairs against the noise control. The *_standard_v1.* files are the same
# commands on the first joint-standard (σ 0.05 on the classification batch only; replaced, in git history).
# Run from the repository root: CIFAR10_ROOT=... bash results/joint/run_standard_v2.sh
set -uo pipefail
T=contrastive-head,inpainting-head,rotation-head,consistency,hedge
W=weights/joint-standard
run() { echo "[$(date +%H:%M:%S)] $*"; "$@"; echo "[$(date +%H:%M:%S)] exit $?"; }
[ -f $W/calibration.json ] || run python cli.py calibrate --weights $W --tasks $T --n 2000 --views 4
[ -f $W/calibration_views2.json ] || run python cli.py calibrate --weights $W --tasks $T --n 2000 --views 2 \
    --out $W/calibration_views2.json
run python -m bench.attack_signal --n 1000 --weights $W --tasks $T --json results/joint/signal_standard.json
common="--weights $W --calibration $W/calibration_views2.json --views 2 --repair-steps 20 --gate-tasks $T --quiet"
run python cli.py eval --n 500 --attacks none,pgd --repairs none,noise,hedge,mtl-joint,mtl-joint:clean:exit \
    $common --json results/joint/headline_standard.json --markdown results/joint/headline_standard.md
# joint-robust's per-task ablation (the first run's script left it out for CPU time), each task alone with the
# clean-level objective and the early exit (the default repair form; 5–8× cheaper), with and without the gate
W=weights/joint-robust
run python cli.py eval --n 500 --attacks none,pgd --repairs none,noise,contrastive-head:clean:exit,inpainting-head:clean:exit,rotation-head:clean:exit,consistency:clean:exit,hedge:clean:exit,mtl-joint:clean:exit,noise:gate,mtl-joint:clean:exit:gate \
    --weights $W --calibration $W/calibration_views2.json --views 2 --repair-steps 20 --gate-tasks $T --quiet \
    --json results/joint/ablation_robust.json --markdown results/joint/ablation_robust.md
