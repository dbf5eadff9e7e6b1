#!/usr/bin/env bash
# Ray Data against one process on the same folder: the 128 example images COPIES times over (default 4: 512
# images), under other names, the default repair. Writes results/ray/throughput_<images>.json. Run on a quiet machine:
#   bash bench/ray_throughput.sh [WORKERS] [COPIES] [RUNS] [REPEATS]
# RUNS: a comma-separated subset of one_process_2threads,one_process_1thread,ray,ray_1worker_2cpus (default all);
# REPEATS (default 1): the runs in turn, that many rounds (2 shared cores vary from minute to minute: compare the
# backends within a round, and take the median over rounds).
set -euo pipefail
W=${1:-2}
COPIES=${2:-4}
RUNS=${3:-one_process_2threads,one_process_1thread,ray,ray_1worker_2cpus}
REPEATS=${4:-1}
for name in ${RUNS//,/ }; do
  case $name in one_process_2threads|one_process_1thread|ray|ray_1worker_2cpus) ;;
    *) echo "unknown run '$name' (known: one_process_2threads,one_process_1thread,ray,ray_1worker_2cpus)" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/images"
for k in $(seq 0 $((COPIES - 1))); do
  for f in examples/clean/*.png examples/attacked/*.png; do
    cp "$f" "$work/images/${k}_$(basename "$(dirname "$f")")_$(basename "$f")"
  done
done
N=$(ls "$work/images" | wc -l)
run() {  # the run's key in RUNS, its name in the results, then the repair options; prints the report's summary
  local key=$1 name=$2; shift 2
  [[ ",$RUNS," == *",$key,"* ]] || return 0
  local t0=$(date +%s.%N)
  python cli.py repair --input "$work/images" --output "$work/${name}_$round" --quiet "$@" > /dev/null
  local t1=$(date +%s.%N)
  python - "$name" "$round" "$t0" "$t1" "$work/${name}_$round/report.json" <<'PY'
import json, sys
name, rnd, t0, t1, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
s = json.load(open(path))["summary"]
print(json.dumps({"run": name, "round": rnd, "wall_s": round(t1 - t0, 2), "repair_s": s["seconds"], "n": s["n_repaired"],
                  "images_per_s_wall": round(s["n_repaired"] / (t1 - t0), 3), "images_per_s_repair": s["images_per_s"],
                  "workers": s.get("ray_workers"), "ray_startup_s": s.get("ray_startup_s"),
                  "images_per_s_after_startup": s.get("images_per_s_after_startup")}))
PY
}
mkdir -p results/ray
out=results/ray/throughput_$N.json
for round in $(seq 1 "$REPEATS"); do
  run one_process_2threads one_process_2threads --threads 2
  run one_process_1thread one_process_1thread --threads 1
  run ray "ray_${W}workers" --ray --workers "$W" --worker-cpus 1
  run ray_1worker_2cpus ray_1worker_2cpus --ray --workers 1 --worker-cpus 2
done | tee "$out.jsonl"
python - "$work" "$out" "bash bench/ray_throughput.sh $W $COPIES $RUNS $REPEATS" <<'PY'
import json, statistics, sys
from pathlib import Path
work, out, command = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
runs = [json.loads(l) for l in open(out + ".jsonl")]
dirs = [work / f"{r['run']}_{r['round']}" for r in runs]
pngs = sorted(dirs[0].glob("*.png"))
same = bool(pngs) and all((dirs[0] / p.name).read_bytes() == (d / p.name).read_bytes() for d in dirs[1:] for p in pngs)
print(f"PNGs byte-identical across the runs: {same}")
ratios = {}                     # each Ray run against the 2-thread process of its own round
for r in runs:
    base = [b for b in runs if b["run"] == "one_process_2threads" and b["round"] == r["round"]]
    if r["run"].startswith("ray") and base:
        for key in ("wall", "repair"):
            ratios.setdefault(f"{r['run']}_{key}", []).append(r[f"images_per_s_{key}"] / base[0][f"images_per_s_{key}"])
        if r["images_per_s_after_startup"]:
            ratios.setdefault(f"{r['run']}_after_startup", []).append(
                r["images_per_s_after_startup"] / base[0]["images_per_s_repair"])
medians = {k: round(statistics.median(v), 3) for k, v in ratios.items()}
for k, v in medians.items():
    print(f"{k}: median {v}× one 2-thread process over {len(ratios[k])} round(s)")
json.dump({"runs": runs, "pngs_identical": same, "ratios_to_one_process_2threads": medians, "command": command},
          open(out, "w"), indent=2)
PY
rm "$out.jsonl"
