"""The leaderboard users choose a mode from: validation and test error per epoch, every mode, several seeds.

How the table is made (so that a reviewer can check it):
- 5,000 of Fashion-MNIST's 60,000 training images are held out as a validation split (fixed by ``--split-seed``,
  the same for every run, never augmented); every run trains on the other 55,000.
- Every run evaluates both the validation split and the test set after each epoch. Modes and options are chosen
  on the *validation* error only (mean over seeds); the test error is reported for the final table.
- One run = one method and one seed; the seed sets the model's initialisation and the data order. Each run is
  written to its own file in ``--runs`` as soon as it ends, named ``<method>-seed<N>.json``, and a later call
  reuses it by name, so the table can be filled over several working stretches.
- A run records the commit it ran at and refuses to start with uncommitted changes to lfnnify/ or benchmarks/
  (``--allow-dirty`` for quick looks, which the table then marks). The table names every commit its rows
  come from and says whether they are one.
- Same model (timm resnet18, in_chans=1, K=4 where it applies), optimizer and epochs for every row: SGD lr 0.05,
  momentum 0.9, weight decay 5e-4, cosine decay over all steps, batch 128, random crop 28 (padding 2) +
  horizontal flip, one thread per run, ``--jobs`` runs side by side.

Reproduce (the committed table):
  python -m benchmarks.accuracy_fashion_mnist --epochs 3 --seeds 0 1 2 --jobs 2 \
      --methods bp local local_lookahead local_lookahead_layer replay_stash replay_stash_predict
Quick look: python -m benchmarks.accuracy_fashion_mnist --epochs 1 --train-subset 2000 --methods bp replay \
      --runs /tmp/runs --allow-dirty
Tiny (tests): --model test_resnet --train-subset 128 --eval-subset 64 --batch-size 64
Clean seconds per epoch (one run alone): --time-steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import (  # noqa: E402
    RESULTS,
    environment,
    hardware_tag,
    peak_rss_bytes,
    refuse_bad_arguments,
    refuse_uncommitted,
    write_json,
)

# name -> (label, convert knobs, trainer knobs); None = plain backprop, written out by hand
REFRESH = {"refresh_heads_every": 10, "refresh_momentum": 0.9}  # an EMA of about 0.99 per step, as MAN uses
REPLAY = dict(blocks=4, mode="replay")
METHODS = {
    "bp": ("backprop", None, {}),
    "local": ("LFNN-ℓ, GAP+linear heads (the paper)", dict(blocks=4), {}),
    "local_lookahead": ("LFNN-ℓ, look-ahead heads (next stage)", dict(blocks=4, head="lookahead"), {}),
    "local_lookahead_layer": ("LFNN-ℓ, look-ahead heads (next layer)", dict(blocks=4, head="lookahead-layer"), {}),
    "local_lookahead_refresh": ("LFNN-ℓ, look-ahead heads (next stage), refreshed every 10 steps, momentum 0.9",
                                dict(blocks=4, head="lookahead"), REFRESH),
    "filterwise": ("LFNN-ℓ, 4 filter-wise workers, δ=0.7", dict(blocks=4, workers=4, leaders=0.7), {}),
    "lfnn_eq1": ("LFNN, Eq. 1 (global loss kept; not pipeline-capable)", dict(blocks=4, mode="lfnn"), {}),
    "replay": ("replay, recompute", REPLAY, {}),
    "replay_local": ("replay, recompute, + 0.3 × local loss", dict(REPLAY, local_weight=0.3), {}),
    "replay_predict": ("replay, recompute, weight prediction", dict(REPLAY, weight_prediction=True), {}),
    "replay_stash": ("replay, weight stashing", dict(REPLAY, weight_stashing=True), {}),
    "replay_stash_predict": ("replay, weight stashing + weight prediction",
                             dict(REPLAY, weight_stashing=True, weight_prediction=True), {}),
    "replay_stash_delay_lr": ("replay, weight stashing, delay-aware step sizes over epoch 1 (PipeMare)",
                              dict(REPLAY, weight_stashing=True), {"delay_lr_epochs": 1}),
    "replay_stash_predict_delay_lr": ("replay, weight stashing + weight prediction, delay-aware step sizes over "
                                      "epoch 1", dict(REPLAY, weight_stashing=True, weight_prediction=True),
                                      {"delay_lr_epochs": 1}),
    "replay_stash_delay_lr_sc": ("replay, weight stashing, delay-aware step sizes over epoch 1, spike compensation",
                                 dict(REPLAY, weight_stashing=True, spike_compensation=True), {"delay_lr_epochs": 1}),
    "local_then_replay": ("local for epoch 1, then replay", dict(blocks=4), {"switch_to": "replay",
                                                                             "switch_epochs": 1}),
}
PIPELINE_CAPABLE = set(METHODS) - {"bp", "lfnn_eq1"}
VALIDATION = 5000
# settings added after runs were kept, with the value those runs had: a kept run without one is read as this
ADDED_SETTINGS = {"model": "resnet18", "eval_subset": None, "cuts": None}


def _optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def splits(args):
    """(train, validation, test): the validation images are the same for every run and never augmented."""
    from torch.utils.data import Subset

    from lfnnify.data import FashionMNIST

    order = torch.randperm(60000, generator=torch.Generator().manual_seed(args.split_seed)).tolist()
    held, kept = sorted(order[:VALIDATION]), sorted(order[VALIDATION:])
    if args.train_subset:
        kept = kept[: args.train_subset]
    train = Subset(FashionMNIST(args.data, train=True, augment=True), kept)
    val = Subset(FashionMNIST(args.data, train=True, augment=False), held[: args.eval_subset])
    test = FashionMNIST(args.data, train=False)
    return train, val, (Subset(test, range(args.eval_subset)) if args.eval_subset else test)


def _build(name, args, steps_per_epoch):
    """(step function, evaluate function, facts) of one row, seeded."""
    import timm

    import lfnnify

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, in_chans=1, num_classes=10)
    facts = {"model_params": sum(p.numel() for p in model.parameters()), "head_params": 0}
    total_steps = args.epochs * steps_per_epoch
    _, knobs, trainer_knobs = METHODS[name]
    if knobs is not None and args.cuts:  # the K-1 cuts named, instead of K blocks balanced by flops
        knobs = {**{k: v for k, v in knobs.items() if k != "blocks"}, "cuts": args.cuts}
    if knobs is None:
        opt = _optimizer(model.parameters(), args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)

        def step(x, y):
            model.train()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()

        @torch.no_grad()
        def evaluate(loader):
            model.eval()
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
            return {"accuracy": correct / len(loader.dataset)}

        return step, evaluate, facts
    net = lfnnify.convert(model, **knobs, example_input=torch.zeros(1, 1, 28, 28))
    switch = {}
    if "switch_to" in trainer_knobs:
        switch = {"switch_to": trainer_knobs["switch_to"],
                  "switch_mode_at": trainer_knobs["switch_epochs"] * steps_per_epoch}
    extra = {k: v for k, v in trainer_knobs.items() if k.startswith("refresh_")}
    if "delay_lr_epochs" in trainer_knobs:
        extra["delay_lr_warmup"] = trainer_knobs["delay_lr_epochs"] * steps_per_epoch
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: _optimizer(ps, args.lr),
                              scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps),
                              progress=False, **switch, **extra)
    facts.update(cuts=net.plan.cuts, head_params=net.plan.total_head_params)
    return trainer.train_step, trainer.evaluate, facts


def run_method(name: str, args) -> dict:
    """One run (one method, one seed), in this process: train ``args.epochs`` epochs, evaluate after each."""
    from lfnnify.data import make_loader

    torch.set_num_threads(args.threads)
    train, val, test = splits(args)
    loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    val_loader, test_loader = (make_loader(d, batch_size=512, shuffle=False) for d in (val, test))
    step, evaluate, facts = _build(name, args, len(loader))
    val_error, test_error, block_val_error, epoch_seconds = [], [], [], []
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for x, y in loader:
            step(x, y)
        epoch_seconds.append(time.perf_counter() - start)
        v, t = evaluate(val_loader), evaluate(test_loader)
        val_error.append(100 * (1 - v["accuracy"]))
        test_error.append(100 * (1 - t["accuracy"]))
        if "block_accuracy" in v:
            block_val_error.append([100 * (1 - a) for a in v["block_accuracy"]])
        print(f"  {name} seed {args.seed} epoch {epoch + 1}: validation error {val_error[-1]:.2f}% "
              f"({epoch_seconds[-1]:.0f} s)", flush=True)
    return {"method": name, "seed": args.seed, "val_error": val_error, "test_error": test_error,
            "block_val_error": block_val_error, "epoch_seconds": epoch_seconds, "peak_rss_bytes": peak_rss_bytes(),
            **facts}


def time_method(name: str, args) -> dict:
    """Seconds per training step of one row, alone on one thread: ``args.time_steps`` steps after 3 warm-up."""
    from lfnnify.data import make_loader

    torch.set_num_threads(args.threads)
    train, _, _ = splits(args)
    loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    step, _, _ = _build(name, args, len(loader))
    loader.sampler.set_epoch(0)
    times = []
    for i, (x, y) in enumerate(loader):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
        if i + 1 == 3 + args.time_steps:
            break
    return {"step_seconds": times[3:], "median_step_s": statistics.median(times[3:]),
            "steps_per_epoch": len(loader), "peak_rss_bytes": peak_rss_bytes()}


# ---------------------------------------------------------------- runs, by name


def _run_file(args, name: str, seed: int) -> Path:
    return args.runs / f"{name}-seed{seed}.json"


def _settings(args) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
            "train_subset": args.train_subset, "split_seed": args.split_seed, "validation": VALIDATION,
            "model": args.model, "eval_subset": args.eval_subset, "cuts": args.cuts}


def _run_all(todo: list[tuple[str, int]], args) -> None:
    """Every (method, seed) in its own process, ``args.jobs`` at a time; each result file is written as it ends.
    An item may carry its own arguments, ``(method, seed, run_args)`` (runs of several lengths side by side)."""
    running, queue = [], list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            name, seed, *own = queue.pop(0)
            run_args = own[0] if own else args
            out = _run_file(run_args, name, seed)
            cmd = [sys.executable, "-m", "benchmarks.accuracy_fashion_mnist", "--child", name, "--child-out", str(out),
                   *_forwarded(run_args, seed)]
            print(f"{name} seed {seed}: started ({len(queue)} waiting)", flush=True)
            proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            running.append((name, seed, proc))
        time.sleep(2)
        for item in list(running):
            name, seed, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"{name} seed {seed} failed with exit code {proc.returncode}")


def _forwarded(args, seed: int) -> list[str]:
    out = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(seed), "--threads", str(args.threads), "--split-seed", str(args.split_seed),
           "--time-steps", str(args.time_steps), "--model", args.model]
    for flag, value in (("--train-subset", args.train_subset), ("--eval-subset", args.eval_subset)):
        if value:
            out += [flag, str(value)]
    if args.cuts:
        out += ["--cuts", *args.cuts]
    if args.data:
        out += ["--data", args.data]
    return out


def _child(args) -> None:
    run = time_method if args.time_steps else run_method
    started = environment(args.threads)
    result = run(args.child, args)
    payload = {**result, "settings": _settings(args), "commit": started["commit"], "env_before": started,
               "env": environment(args.threads), "command": " ".join(["python", *sys.argv])}
    write_json(args.child_out, payload)


# ---------------------------------------------------------------- the table


def check_counts(args) -> None:
    refuse_bad_arguments("accuracy_fashion_mnist.py", args, counts=("jobs", "threads", "epochs", "batch_size"))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(rows: dict[str, list[dict]], epochs: int) -> dict:
    """Per method: mean and standard deviation over seeds of every epoch's validation and test error."""
    out = {}
    for name, runs in rows.items():
        entry = {"seeds": [r["seed"] for r in runs], "commits": sorted({r["commit"] for r in runs}),
                 "head_params": runs[0].get("head_params", 0), "model_params": runs[0]["model_params"],
                 "s_per_epoch": statistics.mean(s for r in runs for s in r["epoch_seconds"])}
        for key in ("val_error", "test_error"):
            entry[key] = [_mean_sd([r[key][e] for r in runs]) for e in range(epochs)]
        out[name] = entry
    return out


def choose(summary: dict) -> str | None:
    """The pipeline-capable method with the lowest mean validation error after the last epoch."""
    capable = {m: s for m, s in summary.items() if m in PIPELINE_CAPABLE}
    return min(capable, key=lambda m: capable[m]["val_error"][-1][0]) if capable else None


def table(summary: dict, epochs: int, key: str) -> str:
    lines = ["| method | seeds | " + " | ".join(f"epoch {e + 1}" for e in range(epochs))
             + " | heads' params (share) | s/epoch |", "|---|---|" + "---|" * (epochs + 2)]
    for name, s in summary.items():
        cells = " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in s[key])
        share = 100 * s["head_params"] / s["model_params"]
        lines.append(f"| {METHODS[name][0]} | {len(s['seeds'])} | {cells} | {s['head_params']:,} ({share:.1f}%) | "
                     f"{s['s_per_epoch']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["bp", "local", "replay_stash"], choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # one run's seed (children)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--split-seed", type=int, default=2026, help="which 5,000 training images are held out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one process each)")
    parser.add_argument("--model", default="resnet18", help="a timm model, in_chans=1 (tests: test_resnet)")
    parser.add_argument("--cuts", nargs="+", default=None,
                        help="the K-1 cut names (e.g. layer1 layer2 layer3, the paper's); default: K=4 by flops")
    parser.add_argument("--train-subset", type=int, default=None, help="train on only the first N of the 55,000")
    parser.add_argument("--eval-subset", type=int, default=None,
                        help="evaluate only the first N validation and N test images (quick looks, tests)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    parser.add_argument("--runs", type=Path, default=RESULTS / "accuracy_runs",
                        help="one file per finished run; runs already there are reused by name")
    parser.add_argument("--allow-dirty", action="store_true", help="run with uncommitted changes (quick looks only)")
    parser.add_argument("--name", default=None, help="result file stem (default: experiment, model, hardware, date)")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="only time each method: this many steps after 3 warm-up, one at a time, seed 0")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    check_counts(args)
    refuse_uncommitted("accuracy_fashion_mnist.py", args.allow_dirty)
    if args.time_steps:  # one method after another, nothing beside them: clean seconds per step
        args.jobs, args.runs = 1, args.out / f"accuracy_timing-{hardware_tag()}-{environment()['date'][:10]}"
        args.runs.mkdir(parents=True, exist_ok=True)
        _run_all([(m, 0) for m in args.methods], args)
        for name in args.methods:
            t = json.loads(_run_file(args, name, 0).read_text())
            print(f"{METHODS[name][0]:<55} {t['median_step_s'] * 1e3:7.0f} ms/step  "
                  f"{t['median_step_s'] * t['steps_per_epoch']:6.0f} s/epoch (one thread)")
        return None

    args.runs.mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for s in args.seeds for m in args.methods if not _run_file(args, m, s).exists()]
    if todo:
        _run_all(todo, args)
    rows: dict[str, list[dict]] = {}
    for m in args.methods:
        rows[m] = [json.loads(_run_file(args, m, s).read_text()) for s in args.seeds]
        for r in rows[m]:
            if {**ADDED_SETTINGS, **r["settings"]} != _settings(args):
                raise SystemExit(f"{_run_file(args, m, r['seed'])} was run with other settings ({r['settings']}); "
                                 f"move it away or use another --runs folder")
    summary = summarise(rows, args.epochs)
    commits = sorted({c for s in summary.values() for c in s["commits"]})
    best = choose(summary)
    payload = {
        "experiment": "accuracy_fashion_mnist",
        "model": f"timm {args.model} (in_chans=1, num_classes=10), K=4",
        "protocol": "trained on 55,000 training images; modes chosen on the 5,000 held out (validation); test "
                    "error reported for the table; mean ± standard deviation over seeds",
        "settings": _settings(args), "seeds": args.seeds, "summary": summary, "runs": rows,
        "labels": {m: METHODS[m][0] for m in summary}, "chosen_on_validation": best,
        "one_commit": len(commits) == 1 and not commits[0].endswith("+dirty"), "commits": commits,
        "env": environment(args.threads),
        "command": " ".join(["python -m benchmarks.accuracy_fashion_mnist", *sys.argv[1:]]),
    }
    stem = args.name or f"accuracy_fashion_mnist-{args.model}-k4-seeds-{hardware_tag()}-{payload['env']['date'][:10]}"
    path = write_json(args.out / f"{stem}.json", payload)
    from lfnnify.plots import plot_curves

    plot_curves({METHODS[n][0]: [m for m, _ in s["test_error"]] for n, s in summary.items()}, args.out / f"{stem}.png",
                spread={METHODS[n][0]: [0.0 if math.isnan(sd) else sd for _, sd in s["test_error"]]
                        for n, s in summary.items()},
                title=f"Fashion-MNIST, timm {args.model}, K=4: mean test error over {len(args.seeds)} seeds "
                      "(bars: one standard deviation)")
    text = (f"validation error (%), mean ± sd over seeds {args.seeds}:\n\n{table(summary, args.epochs, 'val_error')}"
            f"\n\ntest error (%):\n\n{table(summary, args.epochs, 'test_error')}\n\n"
            f"rows from commit(s) {', '.join(commits)}" + ("" if payload["one_commit"] else " (NOT one clean commit)"))
    if best and "bp" in summary:
        (m, sd), (bm, bsd) = summary[best]["test_error"][-1], summary["bp"]["test_error"][-1]
        text += (f"\nchosen on validation: {METHODS[best][0]}; its test error {m:.2f} ± {sd:.2f} against backprop's "
                 f"{bm:.2f} ± {bsd:.2f} ({m - bm:+.2f} points)")
    (args.out / f"{stem}.md").write_text(text + "\n")
    print("\n" + text + f"\nwrote {path}")
    return None


if __name__ == "__main__":
    main()
