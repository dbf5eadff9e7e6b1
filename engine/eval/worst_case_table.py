"""The worst case's bookkeeping and report: per-image outcomes (right / wrong under each attack, on each scoring)
into accuracy rows with Wilson intervals, the worst case per image, McNemar against the base, the verdict, and the
markdown table (engine/eval/worst_case.py runs the attacks)."""
from __future__ import annotations

import statistics

from .stats import mcnemar_exact, wilson_interval


def stronger_name(attack: str, budget: tuple[int, int]) -> str:
    """The row of an APGD run once more at the stronger budget (iterations, eot), e.g. ``apgd-ce (I 200, E 8)``."""
    return f"{attack} (I {budget[0]}, E {budget[1]})"


def verdict(test: dict, alpha: float = 0.05, better: str = "improves", worse: str = "weakens") -> str:
    """``better`` / ``worse`` at 95 % (exact McNemar, a = the reference, b = the defense's worst case), or neither;
    against the base: improves / weakens it."""
    if test["p"] >= alpha:
        return "no measurable difference"
    return better if test["b_only"] > test["a_only"] else worse


def accuracy_row(correct: list[bool]) -> dict:
    return {"accuracy": sum(correct) / len(correct), "ci95": list(wilson_interval(sum(correct), len(correct)))}


def robust_every_time(runs: list[list[bool]]) -> list[bool]:
    """Per image: right on every repeat (``runs``: per repeat, per image)."""
    return [all(image) for image in zip(*runs)]


def summarize(base: list[bool], defenses: dict[str, dict[str, list[list[bool]]]], cumulative: bool = False,
              control: str | None = None) -> dict:
    """Rows of accuracy with Wilson intervals: the base, each attack on each defense (robust = right on every
    repeat), each defense's worst case (robust = right under every attack on every repeat; also per repeat, mean ±
    std), and McNemar of each worst case against the base with its verdict; given the name of a ``control`` among
    the defenses (the CLI's: the noise control), McNemar of each other one's worst case against the control's as
    well (a repair that beats the base but not the noise control owes its gain to noise of its size, not to its
    descent).

    ``cumulative``: each attack ran only on the images that some scoring of every earlier one left right (an image
    not attacked is recorded wrong on every scoring), so its row is given as the accuracy under it and every attack
    before it; the worst case and its figures per repeat are the same as otherwise."""
    n, row = len(base), accuracy_row
    out = {"n": n, "base": row(base), "rows": "cumulative" if cumulative else "each attack", "defenses": {}}
    for name, attacks in defenses.items():
        repeats = len(next(iter(attacks.values())))
        every = {a: robust_every_time(runs) for a, runs in attacks.items()}
        if cumulative:
            so_far = [True] * n
            for a in every:
                every[a] = so_far = [before and now for before, now in zip(so_far, every[a])]
        worst = [all(every[a][i] for a in attacks) for i in range(n)]
        per_repeat = [sum(all(attacks[a][r][i] for a in attacks) for i in range(n)) / n for r in range(repeats)]
        over_repeats = lambda a: {} if cumulative else {
            "mean_over_repeats": statistics.mean(sum(r) / n for r in attacks[a])}
        test = mcnemar_exact(base, worst)
        out["defenses"][name] = {
            "attacks": {a: {**row(c), **over_repeats(a)} for a, c in every.items()},
            "worst_case": {**row(worst), "per_repeat": per_repeat, "mean": statistics.mean(per_repeat),
                           "std": statistics.stdev(per_repeat) if repeats > 1 else 0.0},
            "mcnemar_vs_base": test, "verdict": verdict(test), "worst_correct": worst,
            "correct": every}                            # per attack, per image: robust on every repeat
    if control is not None:
        reference = out["defenses"][control]["worst_correct"]
        for name, defense in out["defenses"].items():
            if name != control:
                test = mcnemar_exact(reference, defense["worst_correct"])
                judged = verdict(test, better="beats the control", worse="below the control")
                defense["vs_control"] = {"control": control, **test, "verdict": judged}
    return out


def summarize_transfer(base: list[bool], transfer: dict[str, list[list[bool]]]) -> dict:
    """The base and each defense's transfer row (robust = right on every repeat) on all the images, with McNemar."""
    every = {name: robust_every_time(runs) for name, runs in transfer.items()}
    return {"n": len(base), "base": accuracy_row(base),
            "defenses": {name: {**accuracy_row(c), "mcnemar_vs_base": mcnemar_exact(base, c)}
                         for name, c in every.items()}}


def attacked_model(cfg: dict) -> str:
    """Which defense the table attacked, in words (a table made before the option existed: the randomized one)."""
    if cfg.get("deployment", "randomized") == "fixed":
        return (f"the defense attacked is the one deployed: the repair at seed {cfg['repair_seed']} (`cli.py repair "
                f"--seed {cfg['repair_seed']}`), which Square queries and every attack's kept point is judged on; "
                f"each final image scored once on it (--deployment fixed)")
    return (f"an image counts as robust only if right on all {cfg['repeats']} scorings of the real defense, "
            f"fresh draws on every query and scoring (--deployment randomized)")


def markdown_table(result: dict) -> str:
    pct = lambda r: f"{100 * r['accuracy']:.1f} ({100 * r['ci95'][0]:.1f}–{100 * r['ci95'][1]:.1f})"
    names = list(result["defenses"])
    cfg = result["config"]
    lines = [f"n = {result['n']} images, ε = {cfg['eps'] * 255:.3g}/255; accuracy % (95 % Wilson CI); "
             + attacked_model(cfg), "",
             "| attack | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| AutoAttack on the classifier alone (the base) | " + " | ".join(pct(result["base"]) for _ in names)
             + " |"]
    cumulative = result.get("rows") == "cumulative"
    for i, attack in enumerate(result["defenses"][names[0]]["attacks"]):
        label = f"+ {attack}" if cumulative and i else attack
        lines.append(f"| {label} | " + " | ".join(pct(result["defenses"][d]["attacks"][attack]) for d in names)
                     + " |")
    worst = [result["defenses"][d]["worst_case"] for d in names]
    lines.append("| **worst case** | " + " | ".join(f"**{pct(w)}**" for w in worst) + " |")
    if cfg["repeats"] > 1:
        lines.append("| worst case per repeat, mean ± std | " + " | ".join(
            f"{100 * w['mean']:.1f} ± {100 * w['std']:.1f}" for w in worst) + " |")
    if cumulative:
        lines[0] += ("; each attack ran only on the images the rows above had not broken on every scoring "
                     "(--survivors): a row is the accuracy under it and all above it")
    if cfg.get("stronger"):
        iterations, eot = cfg["stronger"]
        lines[0] += (f"; {stronger_name('apgd-ce', cfg['stronger'])} and its DLR twin: APGD once more at {iterations} "
                     f"iterations and EOT {eot} after every other attack (--stronger)")
    lines += ["", "| worst case vs base (exact McNemar) | base right only | defense right only | p | verdict |",
              "|---|---|---|---|---|"]
    for d in names:
        t = result["defenses"][d]["mcnemar_vs_base"]
        lines.append(f"| {d} | {t['a_only']} | {t['b_only']} | {t['p']:.3g} | **{result['defenses'][d]['verdict']}** |")
    against_control = [d for d in names if "vs_control" in result["defenses"][d]]
    if against_control:
        lines += ["", "| worst case vs the control's (exact McNemar) | control | control right only | defense right "
                  "only | p | verdict |", "|---|---|---|---|---|---|"]
        for d in against_control:
            t = result["defenses"][d]["vs_control"]
            lines.append(f"| {d} | {t['control']} | {t['a_only']} | {t['b_only']} | {t['p']:.3g} | "
                         f"**{t['verdict']}** |")
    if "transfer_all" in result:
        wide = result["transfer_all"]
        lines += ["", f"On all {wide['n']} images (the attacks on the defense ran on the first {result['n']}): "
                  f"AutoAttack on the classifier alone {pct(wide['base'])}; transfer: " + "; ".join(
                      f"{d} {pct(r)} (McNemar vs base p = {r['mcnemar_vs_base']['p']:.3g})"
                      for d, r in wide["defenses"].items())]
    per_image = result["seconds_per_image"]
    lines += ["", "seconds per image: " + ", ".join(f"{k} {v:.2f}" for k, v in per_image.items())]
    return "\n".join(lines)
