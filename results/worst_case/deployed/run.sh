#!/usr/bin/env bash
# The worst-case tables of the deployed function (#39): `bash results/worst_case/deployed/run.sh TABLE [OPTION...]`
# runs one table's command, with the OPTIONs added (e.g. --ray --ray-address auto: its chunks on a cluster); run it
# again to resume. Each keeps its stages in results/worst_case/deployed/stages (the chunk records are committed; the
# attacked images are not).
set -euo pipefail
cd "$(dirname "$0")/../../.."
export CIFAR10_ROOT="${CIFAR10_ROOT:-$(cd .. && pwd)/shared/data/cifar10}"
OUT=results/worst_case/deployed
BUDGET=(--survivors --chunk 25 --threads 1 --iterations 100 --eot 4 --square-queries 200 --stages "$OUT/stages"
        "${@:2}")
case "${1:-}" in
  cifar10_default)
    python cli.py worst-case --n 1000 --adaptive-n 500 "${BUDGET[@]}" \
      --json "$OUT/cifar10_default.json" --markdown "$OUT/cifar10_default.md" ;;
  cifar10_joint_standard)
    python cli.py worst-case --weights weights/joint-standard --repair mtl-joint --views 2 --repair-steps 20 \
      --n 1000 --adaptive-n 500 "${BUDGET[@]}" \
      --json "$OUT/cifar10_joint_standard.json" --markdown "$OUT/cifar10_joint_standard.md" ;;
  imagenette_default)
    python cli.py worst-case --weights weights/imagenette --data "${IMAGENETTE_ROOT:?the whole Imagenette set}" \
      --eps 4/255 --survivors --chunk 25 --threads 1 --iterations 20 --eot 1 --square-queries 200 \
      --stages "$OUT/stages" --n 500 "${@:2}" \
      --json "$OUT/imagenette_default.json" --markdown "$OUT/imagenette_default.md" ;;
  *) echo "usage: $0 cifar10_default|cifar10_joint_standard|imagenette_default" >&2; exit 2 ;;
esac
