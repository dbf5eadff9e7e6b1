#!/usr/bin/env bash
# Issue-11 measurements of the second joint-standard that run_standard_v2.sh left out: the headline rows on
# 1,000 images, each task alone (plain objective, the winner's form), the gate, the ε_r / steps sweep of the
# best row, AutoAttack transfer and the weak adaptive attacks aimed at it. Two halves, for two cores:
#   CIFAR10_ROOT=... OMP_NUM_THREADS=1 bash results/joint/run_standard_v3.sh a   # headline, AutoAttack, adaptive
#   CIFAR10_ROOT=... OMP_NUM_THREADS=1 bash results/joint/run_standard_v3.sh b   # single tasks, sweep
# Every eval resumes from its partial file if interrupted.
set -uo pipefail
T=contrastive-head,inpainting-head,rotation-head,consistency,hedge
W=weights/joint-standard
R=results/joint
run() { echo "[$(date +%H:%M:%S)] $*"; "$@"; echo "[$(date +%H:%M:%S)] exit $?"; }
common="--weights $W --calibration $W/calibration_views2.json --views 2 --gate-tasks $T --quiet"
case "${1:-}" in
a)
  run python cli.py eval --n 1000 --attacks none,pgd --repairs none,noise,hedge,mtl-joint,mtl-joint:clean:exit \
      --repair-steps 20 $common --json $R/headline_standard.json --markdown $R/headline_standard.md
  run python cli.py eval --n 200 --attacks autoattack --aa-targets 3 --repairs none,noise,hedge,mtl-joint \
      --repair-steps 20 $common --json $R/autoattack_standard.json --markdown $R/autoattack_standard.md
  # weakened to fit the CPU, as for the other models: 10 APGD iterations, a 5-step repair inside the attack
  run python cli.py eval --n 50 --chunk 50 --attacks pgd,aware,autoattack-bpda --aa-iters 10 --bpda-repair-steps 5 \
      --repairs none,noise,mtl-joint --defense mtl-joint --repair-steps 20 $common \
      --json $R/adaptive_standard.json --markdown $R/adaptive_standard.md
  ;;
b)
  run python cli.py eval --n 500 --attacks none,pgd \
      --repairs none,noise,contrastive-head,inpainting-head,rotation-head,consistency,mtl-joint:gate \
      --repair-steps 20 $common --json $R/ablation_standard.json --markdown $R/ablation_standard.md
  for S in "8/255 20" "16/255 40" "8/255 40"; do
    set -- $S; tag=eps$(( ${1%/255} ))_steps$2
    run python cli.py eval --n 500 --attacks none,pgd --repairs none,noise,mtl-joint --eps-r $1 --repair-steps $2 \
        $common --json $R/sweep_standard_$tag.json --markdown $R/sweep_standard_$tag.md
  done
  ;;
*) echo "usage: $0 a|b" >&2; exit 2 ;;
esac
