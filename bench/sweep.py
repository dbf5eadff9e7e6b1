"""The repair's settings grid against PGD: ε_r × steps × views, every point run by `cli.py eval`'s harness (the same
seeded test images and PGD-20 attack as the ablation) with its own noise control at the same ε_r and an exact McNemar
test against it. A point whose JSON already holds the same configuration is read back, not re-run, so an interrupted
sweep resumes (and the eval harness resumes within a point).

The clean-level objective needs clean statistics measured with the same number of contrastive views: where the
shipped calibration has other views, one is measured (2,000 clean training images, as `cli.py calibrate`) and kept
beside the results.

    python -m bench.sweep --n 1000 --out results/ablation/grid
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

from engine.calibration import calibrate, calibration_path, save_calibration
from engine.eval.evaluate import EvalConfig, run_eval, tasks_needed
from engine.pipeline import DEFAULT_TASKS, load_pipeline
from engine.eval.repair_spec import parse_repair


def calibration_for(views: int, out_dir: Path, weights: str | None = None, n: int = 2000) -> Path:
    """The shipped calibration if it was measured with ``views``, else one measured on ``n`` clean training images
    into ``out_dir``."""
    shipped = calibration_path(weights)
    if shipped.exists() and json.loads(shipped.read_text())["views"] == views:
        return shipped
    path = out_dir / f"calibration_views{views}.json"
    if not path.exists():
        pipeline = load_pipeline(weights, tasks=DEFAULT_TASKS, views=views, objective="plain")
        command = f"python cli.py calibrate --tasks {','.join(DEFAULT_TASKS)} --n {n} --views {views} --seed 0"
        save_calibration(calibrate(pipeline, n), path, command)
    return path


def point_path(out_dir: Path, eps_r: float, steps: int, views: int) -> Path:
    return out_dir / f"eps{round(eps_r * 255)}_steps{steps}_views{views}.json"


def run_point(config: EvalConfig, path: Path, calibration: Path | None, weights: str | None = None) -> dict:
    if path.exists():
        done = json.loads(path.read_text())
        if done["config"] == json.loads(json.dumps(asdict(config))):
            return done
    pipeline = load_pipeline(weights, tasks=tasks_needed(config), views=config.views, calibration=calibration,
                             objective="plain")
    return run_eval(pipeline, config, path)


def summary_row(result: dict, repair: str) -> dict:
    """Accuracy of none, noise and the repair, the repair's gain over noise with its McNemar p, and its seconds per
    image on this machine."""
    acc = {r["repair"]: r["accuracy"] for r in result["rows"]}
    test = next(t for t in result["mcnemar"] if t["a"] == "pgd/noise" and t["b"] == f"pgd/{repair}")
    cfg = result["config"]
    return {"eps_r_255": round(cfg["eps_r"] * 255), "steps": cfg["repair_steps"], "views": cfg["views"],
            "none": acc["none"], "noise": acc["noise"], "repair": acc[repair], "gain": acc[repair] - acc["noise"],
            "noise_only": test["a_only"], "repair_only": test["b_only"], "p": test["p"],
            "seconds_per_image": result["seconds"].get(f"repair {repair}", float("nan")) / result["n"]}


def markdown(rows: list[dict], repair: str, n: int) -> str:
    pct = lambda v: f"{100 * v:.1f}"
    lines = [f"| ε_r | steps | views | none | noise | {repair} | vs noise | noise right only / {repair} right only "
             f"| p | s/image |", "|---" * 10 + "|"]
    lines += [f"| {r['eps_r_255']}/255 | {r['steps']} | {r['views']} | {pct(r['none'])} | {pct(r['noise'])} | "
              f"{pct(r['repair'])} | {100 * r['gain']:+.1f} | {r['noise_only']} / {r['repair_only']} | {r['p']:.2g} | "
              f"{r['seconds_per_image']:.2f} |" for r in rows]
    return "\n".join(lines) + f"\n\nPGD-20 (ε 8/255) on n = {n} CIFAR-10 test images; accuracy in %.\n"


def sweep(n: int, repair: str, eps_rs: list[float], steps: list[int], views: list[int], out_dir: Path,
          weights: str | None = None, calibration_n: int = 2000) -> list[dict]:
    spec = parse_repair(repair)
    if not spec.optimize:
        raise ValueError(f"the sweep varies a repair's settings; {repair!r} has none to vary")
    out_dir.mkdir(parents=True, exist_ok=True)
    needs_calibration = spec.objective == "clean" or spec.gated
    rows = []
    for v, e, s in itertools.product(views, eps_rs, steps):
        calibration = calibration_for(v, out_dir, weights, calibration_n) if needs_calibration else None
        config = EvalConfig(n=n, attacks=["pgd"], repairs=["none", "noise", repair], eps_r=e, repair_steps=s,
                            views=v, defense=repair)
        started = time.time()
        rows.append(summary_row(run_point(config, point_path(out_dir, e, s, v), calibration, weights), repair))
        print(f"ε_r {round(e * 255)}/255, {s} steps, {v} views: {100 * rows[-1]['repair']:.1f} % "
              f"(noise {100 * rows[-1]['noise']:.1f} %), {time.time() - started:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repair", default="mtl:clean", help="a `cli.py eval --repairs` name")
    parser.add_argument("--eps-r", default="8,12,16", help="ε_r values in 1/255")
    parser.add_argument("--steps", default="20,40")
    parser.add_argument("--views", default="2,4")
    parser.add_argument("--out", type=Path, default=Path("results/ablation/grid"))
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    ints = lambda text: [int(v) for v in text.split(",")]
    rows = sweep(args.n, args.repair, [v / 255 for v in ints(args.eps_r)], ints(args.steps), ints(args.views),
                 args.out, args.weights)
    table = markdown(rows, args.repair, args.n)
    (args.out / "summary.json").write_text(json.dumps({"n": args.n, "repair": args.repair, "rows": rows}, indent=2))
    (args.out / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
