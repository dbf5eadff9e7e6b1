#!/usr/bin/env bash
# Ray Data against one process on the same folder: 512 images (the 128 example images, four times over, under
# other names), the default repair. Writes results/ray/throughput.json. Run on a quiet machine:
#   bash bench/ray_throughput.sh [WORKERS]
set -euo pipefail
W=${1:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/images"
for k in 0 1 2 3; do
  for f in examples/clean/*.png examples/attacked/*.png; do
    cp "$f" "$work/images/${k}_$(basename "$(dirname "$f")")_$(basename "$f")"
  done
done
run() {  # name, then the repair options; prints name, wall seconds and the report's summary
  local name=$1; shift
  local t0=$(date +%s.%N)
  python cli.py repair --input "$work/images" --output "$work/$name" --quiet "$@" > /dev/null
  local t1=$(date +%s.%N)
  python - "$name" "$t0" "$t1" "$work/$name/report.json" <<'PY'
import json, sys
name, t0, t1, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = json.load(open(path))["summary"]
print(json.dumps({"run": name, "wall_s": round(t1 - t0, 2), "repair_s": s["seconds"], "n": s["n_repaired"],
                  "images_per_s_wall": round(s["n_repaired"] / (t1 - t0), 3), "images_per_s_repair": s["images_per_s"],
                  "workers": s.get("ray_workers")}))
PY
}
mkdir -p results/ray
{
  run one_process_2threads --threads 2
  run one_process_1thread --threads 1
  run ray_${W}workers --ray --workers "$W" --worker-cpus 1
} | tee results/ray/throughput.jsonl
python - "$work" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
runs = [json.loads(l) for l in open("results/ray/throughput.jsonl")]
names = [r["run"] for r in runs]
same = all((work / names[0] / p.name).read_bytes() == (work / n / p.name).read_bytes()
           for n in names[1:] for p in (work / names[0]).glob("*.png"))
print(f"PNGs byte-identical across the runs: {same}")
json.dump({"runs": runs, "pngs_identical": same, "command": "bash bench/ray_throughput.sh"},
          open("results/ray/throughput.json", "w"), indent=2)
PY
rm results/ray/throughput.jsonl
