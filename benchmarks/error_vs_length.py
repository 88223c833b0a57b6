"""Does the gap between lfnnify's modes and backprop close, stay or grow with training length?

The paper trains CIFAR-10 for 64,000 iterations (about 164 epochs); the leaderboard trains 3. This sweep trains
every row at several lengths, each with its own full cosine schedule (one run read at several epochs would not do:
the schedule's length changes the result), three seeds each, and chooses on the validation split as the
leaderboard does (``accuracy_fashion_mnist.py``, whose runs these are: same split, optimizer, augmentation).

- Model: timm ``resnet10t`` (in_chans=1, 4.9M parameters): a real timm ResNet with the four residual stages of
  ResNet-18/101/152 (one basic block each), so K=4 cuts after stages 1, 2 and 3 exactly as the paper cuts
  ResNet-101/152, and a 30-epoch run fits about half an hour of this 2-core machine.
- Rows: backprop; LFNN-ℓ with the paper's heads (GAP + linear); LFNN-ℓ with look-ahead heads (next stage); replay
  with weight stashing and delay-aware step sizes over epoch 1; and at the longest length only, the same replay
  with spike compensation (Kosson et al. 2021).
- Each run is one file, ``<runs>/<L>-epochs/<method>-seed<N>.json``, written when it ends and reused by name, so the
  sweep can be filled over several sittings. Runs of every length share the ``--jobs`` slots, shortest first. A run
  keeps its state after every epoch (``<method>-seed<N>.partial/``), so one killed, or paused by ``--pause-after``,
  continues from its last epoch at the next call, at the commit it started at, and ends as it would have straight.

Reproduce (the committed table; about 12 hours of both cores of the Intel Xeon, about three times that of the AMD
EPYC Zen 3, where a replay epoch of two runs side by side took about 410 s; runs continue across sittings):
  python -m benchmarks.error_vs_length --lengths 3 6 12 30 --seeds 0 1 2 --jobs 2 --threads 1
Tiny (tests): --model test_resnet --cuts layer1 layer2 layer3 --lengths 1 2 --train-subset 128 --eval-subset 64
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections import Counter
from pathlib import Path

from . import accuracy_fashion_mnist as acc  # noqa: E402
from .common import RESULTS, environment, hardware_tag, refuse_uncommitted, write_json  # noqa: E402

ROWS = ["bp", "local", "local_lookahead", "replay_stash_delay_lr"]
LONGEST_ONLY = ["replay_stash_delay_lr_sc"]
CUTS = ["layer1", "layer2", "layer3"]


def _length_args(args, length: int):
    """The accuracy script's arguments for the runs of one length."""
    run_args = copy.copy(args)
    run_args.epochs = length
    run_args.runs = args.runs / f"{length}-epochs"
    return run_args


def _methods(args, length: int) -> list[str]:
    return args.methods + (args.longest_methods if length == max(args.lengths) else [])


def _read(args) -> dict[int, dict[str, list[dict]]]:
    """Every kept run, by length and method; a run made with other settings is refused by name."""
    rows: dict[int, dict[str, list[dict]]] = {}
    for length in args.lengths:
        run_args = _length_args(args, length)
        rows[length] = {}
        for m in _methods(args, length):
            runs = [json.loads(acc._run_file(run_args, m, s).read_text()) for s in args.seeds]
            for r in runs:
                if {**acc.ADDED_SETTINGS, **r["settings"]} != acc._settings(run_args):
                    raise SystemExit(f"{acc._run_file(run_args, m, r['seed'])} was run with other settings "
                                     f"({r['settings']}); move it away or use another --runs folder")
            rows[length][m] = runs
    return rows


def _devices(rows: dict[int, dict[str, list[dict]]]) -> dict[str, int]:
    """How many runs each CPU trained: runs of one sweep may come from different machines of the kind (the runs
    are accuracy, not timings; each file keeps its own device and epoch times)."""
    found = Counter(r["env"]["device"] for methods in rows.values() for runs in methods.values() for r in runs)
    return dict(sorted(found.items()))


def same_training(runs: Path, commits: list[str], methods: list[str]) -> bool | None:
    """Whether runs made at these commits trained alike, by the short runs kept in ``<runs>/same-training/<commit>/``
    (the same settings, one per method, at each commit): True where every method's errors agree epoch by epoch at
    every commit, False where one differs, None where a commit has no such run (nothing shown either way)."""
    folder = runs / "same-training"
    files = {c: {m: folder / c / f"{m}-seed0.json" for m in methods} for c in commits}
    if len(commits) < 2 or not all(f.exists() for by_method in files.values() for f in by_method.values()):
        return None
    for m in methods:
        kept = [json.loads(files[c][m].read_text()) for c in commits]
        if any(r["commit"] != c for r, c in zip(kept, commits)):
            return False
        if any((r["settings"], r["val_error"], r["test_error"])
               != (kept[0]["settings"], kept[0]["val_error"], kept[0]["test_error"]) for r in kept):
            return False
    return True


def provenance(commits: list[str], alike: bool | None, runs_name: str) -> str:
    """Which commits trained the rows, and whether runs of several commits are shown to train alike."""
    if any(c.endswith("+dirty") for c in commits):
        return f"rows from {', '.join(commits)} (NOT clean: uncommitted changes trained some runs)"
    if len(commits) == 1:
        return f"rows from one commit, {commits[0]}"
    said = f"rows from {len(commits)} commits, {', '.join(commits)}"
    if alike is None:
        return said + " (NOT one commit, and no short runs kept to show that they train alike)"
    if alike:
        return said + f", which train alike: a short run of every row gives the same errors at each ({runs_name}/" \
                      "same-training)"
    return said + f": short runs of the rows at those commits DIFFER ({runs_name}/same-training)"


def _cell(mean_sd: tuple[float, float]) -> str:
    m, sd = mean_sd
    return f"{m:.2f} ± {sd:.2f}"


def summarise(rows: dict[int, dict[str, list[dict]]]) -> dict:
    """Per length and method: the final epoch's validation and test error, mean and sd over seeds; the mode chosen
    on validation at each length; and each row's test error minus backprop's, with the spreads beside it."""
    out: dict = {"by_length": {}, "chosen_on_validation": {}}
    for length, methods in rows.items():
        summary = acc.summarise(methods, length)
        entry = {m: {"val_error": s["val_error"][-1], "test_error": s["test_error"][-1], "seeds": s["seeds"],
                     "commits": s["commits"], "head_params": s["head_params"], "model_params": s["model_params"]}
                 for m, s in summary.items()}
        if "bp" in entry:
            bp, bp_sd = entry["bp"]["test_error"]
            for e in entry.values():
                e["test_gap_to_bp"] = e["test_error"][0] - bp
                # "beats" or "behind" only where one standard deviation either side does not overlap
                lo, hi = e["test_error"][0] - e["test_error"][1], e["test_error"][0] + e["test_error"][1]
                e["against_bp"] = ("level" if not (hi < bp - bp_sd or lo > bp + bp_sd)
                                   else "beats" if hi < bp - bp_sd else "behind")
        out["by_length"][length] = entry
        out["chosen_on_validation"][length] = acc.choose(summary)
    return out


def table(summary: dict, lengths: list[int], key: str, labels: dict[str, str]) -> str:
    methods = list(dict.fromkeys(m for length in lengths for m in summary["by_length"][length]))
    lines = ["| method | " + " | ".join(f"{length} epochs" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m in methods:
        cells = [(_cell(summary["by_length"][length][m][key]) if m in summary["by_length"][length] else "–")
                 for length in lengths]
        lines.append(f"| {labels[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[3, 6, 12, 30], help="epochs of each length")
    parser.add_argument("--methods", nargs="+", default=ROWS, choices=list(acc.METHODS))
    parser.add_argument("--longest-methods", nargs="*", default=LONGEST_ONLY, choices=list(acc.METHODS),
                        help="rows trained at the longest length only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--cuts", nargs="+", default=CUTS, help="the K-1 cuts (default: after stages 1, 2, 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--split-seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--eval-subset", type=int, default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--runs", type=Path, default=RESULTS / "error_vs_length_runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None)
    parser.add_argument("--allow-dirty", action="store_true")
    parser.add_argument("--only-run", action="store_true", help="train what is missing, then stop (no table)")
    parser.add_argument("--pause-after", type=int, default=None, metavar="N",
                        help="train at most N more epochs of each run in this call; the next call continues them")
    args = parser.parse_args()
    args.time_steps, args.epochs = 0, max(args.lengths)  # what the accuracy script's runs read
    acc.check_counts(args)
    if any(length < 1 for length in args.lengths) or len(set(args.lengths)) != len(args.lengths):
        raise SystemExit(f"--lengths {args.lengths}: give distinct epoch counts, each at least 1")
    refuse_uncommitted("error_vs_length.py", args.allow_dirty)

    todo = []
    for length in sorted(args.lengths):  # the shortest first: a partial sweep is a table of its first columns
        run_args = _length_args(args, length)
        run_args.runs.mkdir(parents=True, exist_ok=True)
        todo += [(m, s, run_args) for s in args.seeds for m in _methods(args, length)
                 if not acc._run_file(run_args, m, s).exists()]
    if todo:
        acc._run_all(todo, args)
    if acc.stopped_paused(todo, args):
        return
    if args.only_run:
        return

    rows = _read(args)
    summary = summarise(rows)
    lengths = sorted(args.lengths)
    labels = {m: acc.METHODS[m][0] for m in [*args.methods, *args.longest_methods]}
    commits = sorted({c for length in rows for runs in rows[length].values() for r in runs for c in [r["commit"]]})
    devices = _devices(rows)
    alike = same_training(args.runs, commits, list(labels))
    payload = {
        "experiment": "error_vs_length",
        "model": f"timm {args.model} (in_chans=1, num_classes=10), K=4, cuts {args.cuts}",
        "protocol": "each length trains with its own cosine schedule; 55,000 training images, modes chosen on the "
                    "5,000 held out (validation), test error reported; mean ± sd over seeds; 'against_bp' compares "
                    "one standard deviation either side",
        "lengths": lengths, "seeds": args.seeds, "summary": summary, "labels": labels,
        "settings": {length: acc._settings(_length_args(args, length)) for length in lengths},
        "runs": {length: rows[length] for length in lengths},
        "devices": devices, "one_commit": len(commits) == 1 and not commits[0].endswith("+dirty"), "commits": commits,
        "same_training_across_commits": alike,
        "env": environment(args.threads),
        "command": " ".join(["python -m benchmarks.error_vs_length", *sys.argv[1:]]),
    }
    stem = args.name or f"error_vs_length-fashion_mnist-{args.model}-k4-{hardware_tag()}-{payload['env']['date'][:10]}"
    path = write_json(args.out / f"{stem}.json", payload)
    from lfnnify.plots import plot_curves

    series, spread, xs = {}, {}, {}
    for m, label in labels.items():
        points = [(length, summary["by_length"][length][m]["test_error"]) for length in lengths
                  if m in summary["by_length"][length]]
        series[label] = [e for _, (e, _) in points]
        spread[label] = [0.0 if math.isnan(sd) else sd for _, (_, sd) in points]
        xs[label] = [length for length, _ in points]
    plot_curves(series, args.out / f"{stem}.png", spread=spread, x=xs, log_x=True, xlabel="training length (epochs)",
                title=f"Fashion-MNIST, timm {args.model}, K=4: final test error against training length, "
                      f"{len(args.seeds)} seeds (bars: one standard deviation)")
    text = (f"final validation error (%), mean ± sd over seeds {args.seeds}:\n\n"
            f"{table(summary, lengths, 'val_error', labels)}\n\nfinal test error (%):\n\n"
            f"{table(summary, lengths, 'test_error', labels)}\n\n"
            + "\n".join(f"{length} epochs: chosen on validation: {labels.get(c, c)}"
                        for length, c in summary["chosen_on_validation"].items())
            + f"\n\n{provenance(commits, alike, args.runs.name)}; runs on "
            + ", ".join(f"{d} ({n} runs)" for d, n in devices.items()))
    (args.out / f"{stem}.md").write_text(text + "\n")
    print("\n" + text + f"\nwrote {path}")


if __name__ == "__main__":
    main()
