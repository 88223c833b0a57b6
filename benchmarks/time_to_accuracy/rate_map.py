"""Who reaches the target accuracy first across two hosts, at every link rate: the map of time to accuracy.

Reads two kinds of ``benchmarks.time_to_accuracy --hosts 2`` result files:

- **whole runs** (positional): every method trained to the end, 3 seeds, evaluated on the whole test set. They give
  the step at which each method first reaches each target (DDP's final accuracy of that seed, and that less one
  point), and, at their own link rate, the measured training time to it.
- **step times** (``--steps-from``): short runs of the same setting at other rates (and, to check the projection,
  at the rates of the whole runs), made with ``--step-times``. They give each method's seconds per step at that rate,
  from the run's first evaluation to its last (whole local-SGD periods, PowerSGD compressing).

The runs are deterministic: the same seed gives the same evaluations at every link rate (the whole runs show it; this
script refuses files where they differ), so a method's time to a target at another rate is the steps it needed times
its seconds per step there. Methods with a hook (PowerSGD, local SGD) run plain DDP's steps until ``hook_start``:
those steps are counted at plain DDP's step time. Every cell says whether it is **measured** (a whole run at that
rate) or **projected** (steps from the whole runs, seconds per step from a short run); where both exist the script
reports how far the projection was from the measurement.

Two cases, as in ``benchmarks.speed_map``: **fits** (each host could hold the model: every method is a choice) and
**split** (the model must be split: the exact schedules, ``bp_*``). In each, the first choice to reach the target on
every seed (by mean time over seeds) is the baseline; each pipeline family's first is set against it.

Reproduce:  python -m benchmarks.time_to_accuracy.rate_map results/multihost_tta-...-100mbit-....json \\
                results/multihost_tta-...-1gbit-....json --steps-from results/multihost_tta-steps-...json ... \\
                --name tta_map-fashion_mnist-resnet18-k2-<cpu>-<date>
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ..common import RESULTS, first_reaching, write_json
from ..speed_map import FAMILIES, RATE_NAMES, RATE_ORDER, is_choice, is_pipeline

TARGETS = {"final": 0.0, "minus_one_point": 0.01}  # DDP's final accuracy of the seed, less this
HOOKED = ("ddp_fp16", "ddp_powersgd", "local_sgd")  # plain DDP until hook_start


def _runs_by_method(payload: dict) -> dict[str, dict[int, list[dict]]]:
    out: dict[str, dict[int, list[dict]]] = {}
    for key, run in payload["runs"].items():
        method, seed = key.rsplit("-seed", 1)
        out.setdefault(method, {})[int(seed)] = run["evaluations"]
    return out


def _first_hits(runs: dict[str, dict[int, list[dict]]], seeds) -> dict[str, dict[str, dict]]:
    """method -> target -> seed -> the first evaluation at or above the target (None: never), the target being DDP's
    final accuracy of that seed less the target's margin."""
    out: dict[str, dict] = {}
    for target, margin in TARGETS.items():
        for seed in seeds:
            goal = runs["ddp"][seed][-1]["accuracy"] - margin
            for method, by_seed in runs.items():
                out.setdefault(method, {}).setdefault(target, {})[seed] = first_reaching(by_seed[seed], goal)
    return out


def steps_to_targets(wholes: list[dict]) -> tuple[dict, list[int]]:
    """method -> target -> seed -> the step at which it first reached the target (None: never), from the whole runs;
    refuses files whose evaluations of the same method and seed differ (the projection rests on their equality)."""
    seeds = sorted({s for p in wholes for s in p["seeds"]})
    ignored = ("rate", "cuts", "step_times")
    settings = {json.dumps({k: v for k, v in p["settings"].items() if k not in ignored}, sort_keys=True)
                for p in wholes}
    if len(settings) > 1:
        raise SystemExit("rate_map: the whole runs differ in more than their link rate; give files of one setting")
    runs: dict[str, dict[int, list[dict]]] = {}
    for p in wholes:
        for method, by_seed in _runs_by_method(p).items():
            for seed, evals in by_seed.items():
                kept = runs.setdefault(method, {}).setdefault(seed, evals)
                if [(e["step"], e["accuracy"]) for e in kept] != [(e["step"], e["accuracy"]) for e in evals]:
                    raise SystemExit(f"rate_map: {method} seed {seed} evaluated differently in two files: the runs "
                                     f"are not deterministic here, so steps cannot be carried to another rate")
    hits = _first_hits(runs, seeds)
    return {m: {t: {s: hit and hit["step"] for s, hit in by_seed.items()} for t, by_seed in targets.items()}
            for m, targets in hits.items()}, seeds


def measured_seconds(wholes: list[dict]) -> dict[str, dict[str, dict]]:
    """rate -> method -> target -> seed -> the measured training seconds to the target (the whole runs' own; where
    two files at one rate hold the same method, as each sweep's DDP, the first file's)."""
    out: dict[str, dict] = {}
    for p in wholes:
        for method, targets in _first_hits(_runs_by_method(p), p["seeds"]).items():
            for target, by_seed in targets.items():
                cell = out.setdefault(p["settings"]["rate"], {}).setdefault(method, {}).setdefault(target, {})
                for seed, hit in by_seed.items():
                    cell.setdefault(seed, hit["train_seconds"] if hit else None)
    return out


def step_seconds(shorts: list[dict]) -> dict[str, dict[str, dict]]:
    """rate -> method -> {"seconds_per_step", "repetitions", "steps", "hook_start"}: the slope of training seconds
    from each short run's first evaluation to its last (the first seed given): the steps before the first evaluation
    (the first steps' warm-up, and the uncompressed steps before ``--hook-start``) are left out, so a short run wants
    its first evaluation after its hook start, and a window of whole local-SGD periods (``--hook-start 2
    --eval-every 16``, 48 steps). A method at a rate in several files is a repeated measurement: every repetition's
    slope is kept (``repetitions``) and ``seconds_per_step`` is their median."""
    out: dict[str, dict] = {}
    for p in shorts:
        rate = p["settings"]["rate"]
        for method, by_seed in _runs_by_method(p).items():
            evals = by_seed[min(by_seed)]
            if len(evals) < 2:
                raise SystemExit(f"rate_map: {method} at {rate} has {len(evals)} evaluation(s); a short run needs at "
                                 f"least 2 (give --eval-every a quarter of its steps or less)")
            a, b = evals[0], evals[-1]
            slope = (b["train_seconds"] - a["train_seconds"]) / (b["step"] - a["step"])
            entry = out.setdefault(rate, {}).setdefault(method, {
                "repetitions": [], "steps": [a["step"], b["step"]], "hook_start": p["settings"]["hook_start"]})
            if entry["steps"] != [a["step"], b["step"]] or entry["hook_start"] != p["settings"]["hook_start"]:
                raise SystemExit(f"rate_map: {method} at {rate} is in two step-time files that time different steps "
                                 f"({entry['steps']} from hook start {entry['hook_start']}, and "
                                 f"{[a['step'], b['step']]} from {p['settings']['hook_start']}); repeat a short run "
                                 f"with the same settings")
            entry["repetitions"].append(slope)
            entry["seconds_per_step"] = statistics.median(entry["repetitions"])
    return out


def _rate_of(entry: dict, which: str) -> float:
    """A method's seconds per step at a rate: the median of its repetitions, or the lowest or highest of them."""
    return {"median": entry["seconds_per_step"], "low": min(entry["repetitions"]),
            "high": max(entry["repetitions"])}[which]


def projected(method: str, step: int, per_step: dict[str, dict], hook_start: int,
              which: str = "median") -> float | None:
    """Training seconds to ``step`` at a rate whose seconds per step are ``per_step`` (``which``: their median over
    the short runs, or the lowest or highest); a hooked method's first ``hook_start`` steps at plain DDP's step time.
    None where a needed step time was not measured."""
    own = per_step.get(method)
    if own is None:
        return None
    if method.startswith(HOOKED):
        plain = per_step.get("ddp")
        if plain is None:
            return None
        before = min(step, hook_start)
        return before * _rate_of(plain, which) + (step - before) * _rate_of(own, which)
    return step * _rate_of(own, which)


def _cell(rate: str, method: str, by_seed: dict, seeds: list[int], measured: dict, per_rate: dict,
          hook_start: int, target: str, errors: list) -> dict | None:
    """One method's seconds to one target at one rate, seed by seed: measured where a whole run at that rate exists,
    else projected; None where neither can be had."""
    here = measured.get(rate, {}).get(method, {}).get(target)
    steps = per_rate.get(rate, {})
    if here is None and method not in steps:
        return None
    seconds = []
    for seed in seeds:
        step = by_seed[seed]
        guess = projected(method, step, steps, hook_start) if step is not None else None
        if here is not None:
            value = here.get(seed)
            if value is not None and guess is not None:
                errors.append({"rate": rate, "method": method, "target": target, "seed": seed, "measured": value,
                               "projected": guess, "relative_error": guess / value - 1})
        elif step is not None and guess is None:
            return None  # a hooked method whose plain-DDP steps have no step time at this rate
        else:
            value = guess
        seconds.append(value)
    cell = {"seconds": seconds, "reached": sum(v is not None for v in seconds),
            "kind": "measured" if here is not None else "projected",
            "mean_seconds": statistics.mean(seconds) if None not in seconds else None}
    if here is None:  # the spread of a projection: the short runs' lowest and highest seconds per step
        used = [steps[method]] + ([steps["ddp"]] if method.startswith(HOOKED) else [])
        cell["repetitions"] = min(len(e["repetitions"]) for e in used)
        if cell["mean_seconds"] is not None:
            cell["range_seconds"] = [statistics.mean(projected(method, by_seed[seed], steps, hook_start, which)
                                                     for seed in seeds) for which in ("low", "high")]
    return cell


def _spread(cell: dict) -> dict | None:
    """A projected cell's range over its short runs' seconds per step, where they were repeated."""
    if cell.get("repetitions", 1) < 2 or "range_seconds" not in cell:
        return None
    return {"range_seconds": cell["range_seconds"], "repetitions": cell["repetitions"]}


def _case(row: dict, case: str, seeds: int) -> dict:
    """In ``case``, the first choice to reach the target on every seed (the baseline), each pipeline family's first,
    and their ratio."""
    every = {m: c for m, c in row.items() if c["mean_seconds"] is not None}
    base = min((m for m in every if is_choice(m, case)), key=lambda m: every[m]["mean_seconds"], default=None)
    cell = {"baseline": base, "baseline_seconds": every[base]["mean_seconds"] if base else None,
            "baseline_kind": row[base]["kind"] if base else None,
            "baseline_spread": _spread(row[base]) if base else None, "families": {}}
    for family, prefix in FAMILIES.items():
        mine = [m for m in row if m.startswith(prefix)]
        done = [m for m in mine if m in every]
        if done:
            best = min(done, key=lambda m: every[m]["mean_seconds"])
            cell["families"][family] = {"method": best, "seconds": every[best]["mean_seconds"],
                                        "kind": row[best]["kind"], "spread": _spread(row[best]),
                                        "ratio": every[best]["mean_seconds"] / cell["baseline_seconds"] if base
                                        else None}
        elif mine:
            best = max(mine, key=lambda m: row[m]["reached"])
            cell["families"][family] = {"method": best, "seconds": None, "kind": row[best]["kind"],
                                        "reached": f"{row[best]['reached']} of {seeds} seeds"}
    ranked = [m for m in every if is_choice(m, case) or is_pipeline(m)]
    cell["first"] = min(ranked, key=lambda m: every[m]["mean_seconds"], default=None)
    cell["first_per_seed"] = []  # seed by seed, whoever got there first (choices of the case and pipelines)
    for i in range(seeds):
        there = {m: c["seconds"][i] for m, c in row.items() if (is_choice(m, case) or is_pipeline(m))
                 and c["seconds"][i] is not None}
        first = min(there, key=there.get, default=None)
        cell["first_per_seed"].append({"method": first, "seconds": there.get(first), "kind": row[first]["kind"]}
                                      if first else None)
    return cell


def rate_map(wholes: list[dict], shorts: list[dict]) -> dict:
    """rate -> target -> case -> the first baseline, each pipeline family's first and their ratio; every method's
    cell (``cells``); and, where a rate has both, how far each projection was from the measurement."""
    steps, seeds = steps_to_targets(wholes)
    measured, per_rate = measured_seconds(wholes), step_seconds(shorts)
    hook_start = wholes[0]["settings"]["hook_start"]
    cells: dict[str, dict] = {}
    errors: list[dict] = []
    for rate in [r for r in RATE_ORDER if r in measured or r in per_rate]:
        for method, targets in steps.items():
            for target, by_seed in targets.items():
                cell = _cell(rate, method, by_seed, seeds, measured, per_rate, hook_start, target, errors)
                if cell is not None:
                    cells.setdefault(rate, {}).setdefault(target, {})[method] = cell
    out = {rate: {target: {case: _case(row, case, len(seeds)) for case in ("fits", "split")}
                  for target, row in targets.items()} for rate, targets in cells.items()}
    return {"map": out, "cells": cells, "projection_errors": errors, "seeds": seeds,
            "max_abs_projection_error": max((abs(e["relative_error"]) for e in errors), default=None)}


def _seconds(value: float | None, kind: str, spread: dict | None = None) -> str:
    if value is None:
        return "–"
    if kind == "projected" and spread:
        low, high = spread["range_seconds"]
        return f"{value:.0f} s (projected; {low:.0f}–{high:.0f} s over {spread['repetitions']} short runs)"
    return f"{value:.0f} s" + (" (projected)" if kind == "projected" else "")


def markdown(payload: dict) -> str:
    err = payload["max_abs_projection_error"]
    lines = [f"Time to accuracy across two hosts of one core ({payload['device']}), {payload['setting']}; the mean "
             f"training seconds over seeds {payload['seeds']} to DDP's final accuracy of each seed (final) and to that "
             f"less one point; measured at the whole runs' rates, projected elsewhere (the steps each method needed "
             f"times its seconds per step in a short run there). "
             + ("No rate has both, so the projection is unchecked." if err is None else
                f"Where a rate has both, the projection was within {err:.0%} of the measurement.")
             + " Whole runs at " + ", ".join(payload["commits"]["whole_runs"]) + "; short runs at "
             + (", ".join(payload["commits"]["short_runs"]) or "none") + ".", "",
             "| link | target | case | first baseline | LFNN-ℓ (first) | / baseline | replay (first) | / baseline | "
             "first on each seed |", "|---|---|---|---|---|---|---|---|---|"]
    for rate, targets in payload["map"].items():
        for target, cases in targets.items():
            for case, c in cases.items():
                cells = []
                for family in FAMILIES:
                    f = c["families"].get(family)
                    if f is None:
                        cells += ["–", "–"]
                    elif f["seconds"] is None:
                        cells += [f"{f['method']}: reached on {f['reached']}", "–"]
                    else:
                        ratio = f"{f['ratio']:.2f}×" if f["ratio"] is not None else "–"
                        cells += [f"{f['method']} {_seconds(f['seconds'], f['kind'], f.get('spread'))}", ratio]
                spread = c.get("baseline_spread")
                base = (f"{c['baseline']} {_seconds(c['baseline_seconds'], c['baseline_kind'], spread)}"
                        if c["baseline"] else "none on every seed")
                each = ", ".join(f"{f['method']} {_seconds(f['seconds'], f['kind'])}" if f else "none"
                                 for f in c["first_per_seed"])
                lines.append(f"| {RATE_NAMES[rate]} | {target.replace('_', ' ')} | {case} | {base} | "
                             + " | ".join(cells) + f" | {each} |")
    return "\n".join(lines)


def chart(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(payload["map"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, target in zip(axes, TARGETS):
        methods = sorted({m for r in rates for m in payload["cells"][r].get(target, {})})
        for method in methods:
            xs, ys, hollow = [], [], []
            for i, rate in enumerate(rates):
                c = payload["cells"][rate].get(target, {}).get(method)
                if c and c["mean_seconds"] is not None:
                    xs.append(i)
                    ys.append(c["mean_seconds"])
                    hollow.append(c["kind"] == "projected")
            if not xs:
                continue
            (line,) = ax.plot(xs, ys, "-", label=method, linewidth=2 if is_pipeline(method) else 1)
            ax.scatter([x for x, h in zip(xs, hollow) if not h], [y for y, h in zip(ys, hollow) if not h],
                       color=line.get_color(), zorder=3)
            ax.scatter([x for x, h in zip(xs, hollow) if h], [y for y, h in zip(ys, hollow) if h],
                       facecolors="none", edgecolors=line.get_color(), zorder=3)
        ax.set_xticks(range(len(rates)), [RATE_NAMES[r] for r in rates])
        ax.set_yscale("log")
        ax.set_title(f"to DDP's final accuracy{' less one point' if TARGETS[target] else ''}")
        ax.set_xlabel("link (filled: measured; hollow: projected)")
    axes[0].set_ylabel("training seconds (mean over seeds)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy.rate_map", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wholes", nargs="+", type=Path, help="whole-run result files (one per link rate)")
    parser.add_argument("--steps-from", nargs="*", type=Path, default=[], help="short runs' result files")
    parser.add_argument("--name", required=True, help="result file stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    wholes = [json.loads(p.read_text()) for p in args.wholes]
    shorts = [json.loads(p.read_text()) for p in args.steps_from]
    result = rate_map(wholes, shorts)
    s = wholes[0]["settings"]
    payload = {"experiment": "time to accuracy across two hosts, every link rate", **result,
               "device": wholes[0]["env"]["device"],
               "setting": f"timm {s['model']}, batch {s['batch']}, {s['train_subset']} training images, "
                          f"{s['eval_subset']} test images every {s['eval_every']} steps",
               "commits": {"whole_runs": sorted({p["env_before"]["commit"] for p in wholes}),
                           "short_runs": sorted({p["env_before"]["commit"] for p in shorts})},
               "sources": [str(p) for p in args.wholes], "steps_from": [str(p) for p in args.steps_from]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = write_json(args.out / f"{args.name}.json", payload)
    (args.out / f"{args.name}.md").write_text(markdown(payload) + "\n")
    chart(payload, args.out / f"{args.name}.png")
    print(markdown(payload) + f"\nwrote {path}")


if __name__ == "__main__":
    main()
