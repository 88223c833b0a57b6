"""The leaderboard users choose a mode from: validation and test error per epoch, every mode, several seeds.

How the table is made (so that a reviewer can check it):
- 5,000 of Fashion-MNIST's 60,000 training images are held out as a validation split (fixed by ``--split-seed``,
  the same for every run, never augmented); every run trains on the other 55,000.
- Every run evaluates both the validation split and the test set after each epoch. Modes and options are chosen
  on the *validation* error only (mean over seeds); the test error is reported for the final table.
- One run = one method and one seed; the seed sets the model's initialisation and the data order. Each run is
  written to its own file in ``--runs`` as soon as it ends, named ``<method>-seed<N>.json``, and a later call
  reuses it by name, so the table can be filled over several working stretches. An unfinished run keeps its state
  after every epoch in ``<method>-seed<N>.partial/``: killed, or paused by ``--pause-after N``, it continues from
  its last epoch at the next call (at the commit and with the settings it started with) and ends as it would have.
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
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from .common import (  # noqa: E402
    RESULTS,
    commit,
    device_name,
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
BP_STATE, LFNN_STATE = "backprop-state.pt", "checkpoint"  # a paused or killed run's state, in its .partial folder
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


class _Row(NamedTuple):
    """One row, built and seeded: how it trains, evaluates and keeps its state."""

    step: Callable  # (x, y) -> None: one training step
    evaluate: Callable  # loader -> {"accuracy": ...}
    facts: dict  # parameter counts, cuts
    save: Callable  # (folder, steps) -> None: the state to continue from, in a run's .partial folder
    weights: Callable  # () -> the model's state dict


def _build(name, args, steps_per_epoch, resume: Path | None = None) -> _Row:
    """One row, seeded; with ``resume``, the state its ``save`` wrote there is loaded (model, optimizer, scheduler,
    random state, and the trainer's kept batches)."""
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
        if resume is not None:
            state = torch.load(resume / BP_STATE, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])

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

        def save(folder: Path, steps: int) -> None:
            tmp = folder / f"{BP_STATE}.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "steps": steps}, tmp)
            tmp.replace(folder / BP_STATE)

        return _Row(step, evaluate, facts, save, model.state_dict)
    if resume is None:
        net = lfnnify.convert(model, **knobs, example_input=torch.zeros(1, 1, 28, 28))
    else:  # lfnnify rebuilds the conversion it saved, options included
        net = lfnnify.load(resume / LFNN_STATE, model=model)
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
    if resume is not None:
        trainer.load_state_dict(lfnnify.read_trainer_state(resume / LFNN_STATE))
    facts.update(cuts=net.plan.cuts, head_params=net.plan.total_head_params)

    def save(folder: Path, steps: int) -> None:
        assert trainer.step == steps, (trainer.step, steps)  # the trainer counts the steps it was given
        lfnnify.save(net, folder / LFNN_STATE, trainer=trainer)

    return _Row(trainer.train_step, trainer.evaluate, facts, save, net.state_dict)


def _steps_saved(folder: Path) -> int:
    """How many training steps the state kept in ``folder`` has taken."""
    import lfnnify

    if (folder / BP_STATE).exists():
        return int(torch.load(folder / BP_STATE, weights_only=True)["steps"])
    return int(lfnnify.read_trainer_state(folder / LFNN_STATE)["step"])


def run_method(name: str, args) -> dict:
    """One run (one method, one seed), in this process: train ``args.epochs`` epochs, evaluate after each.

    After each epoch the run's state is kept in ``<run>.partial/`` (:func:`partial_folder`): the epoch's record
    (``epoch-<n>.json``, written first) and the training state (written second, replacing the last one whole). A
    run killed at any moment, or paused by ``--pause-after``, continues from its last finished epoch and ends as
    the same run trained straight through would (tests/test_benchmarks.py checks this); the record read back is
    the one of the epoch the state has reached, so a kill between the two writes loses nothing. A continued run's
    ``peak_rss_bytes`` is that of the process that finished it.
    """
    from lfnnify.data import make_loader

    torch.set_num_threads(args.threads)
    train, val, test = splits(args)
    loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    val_loader, test_loader = (make_loader(d, batch_size=512, shuffle=False) for d in (val, test))
    folder = partial_folder(args.child_out) if args.child_out else None
    done, record = 0, {"val_error": [], "test_error": [], "block_val_error": [], "epoch_seconds": [],
                       "epoch_devices": [], "resumed_after": [], "settings": _settings(args),
                       "env_before": environment(args.threads)}
    if folder is not None and ((folder / BP_STATE).exists() or (folder / LFNN_STATE).exists()):
        steps = _steps_saved(folder)
        done = steps // len(loader)
        record = json.loads((folder / f"epoch-{done}.json").read_text())
        refuse_other_run(folder, record, _settings(args), commit())
        record["resumed_after"].append(done)
        print(f"  {name} seed {args.seed}: continues after epoch {done} ({folder})", flush=True)
    row = _build(name, args, len(loader), resume=folder if done else None)
    stop = args.epochs if not args.pause_after else min(args.epochs, done + args.pause_after)
    for epoch in range(done, stop):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for x, y in loader:
            row.step(x, y)
        record["epoch_seconds"].append(time.perf_counter() - start)
        record["epoch_devices"].append(device_name())
        v, t = row.evaluate(val_loader), row.evaluate(test_loader)
        record["val_error"].append(100 * (1 - v["accuracy"]))
        record["test_error"].append(100 * (1 - t["accuracy"]))
        if "block_accuracy" in v:
            record["block_val_error"].append([100 * (1 - a) for a in v["block_accuracy"]])
        print(f"  {name} seed {args.seed} epoch {epoch + 1}: validation error {record['val_error'][-1]:.2f}% "
              f"({record['epoch_seconds'][-1]:.0f} s)", flush=True)
        if folder is not None and epoch + 1 < args.epochs:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / f"epoch-{epoch + 1}.json", record)  # the record first, then the state it belongs to
            row.save(folder, (epoch + 1) * len(loader))
    if stop < args.epochs:
        return {"paused_after": stop}
    return {"method": name, "seed": args.seed, **{k: v for k, v in record.items() if k != "settings"},
            "weights_sha256": weights_sha256(row.weights()), "peak_rss_bytes": peak_rss_bytes(), **row.facts}


def weights_sha256(state: dict) -> str:
    """One digest of a model's final weights and buffers (names, shapes, dtypes and bytes): two runs that end with
    this digest ended with the same model, bit for bit."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def time_method(name: str, args) -> dict:
    """Seconds per training step of one row, alone on one thread: ``args.time_steps`` steps after 3 warm-up."""
    from lfnnify.data import make_loader

    torch.set_num_threads(args.threads)
    train, _, _ = splits(args)
    loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    step = _build(name, args, len(loader)).step
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


def partial_folder(run_file: Path) -> Path:
    """Where an unfinished run keeps its state between epochs: ``<method>-seed<N>.partial/`` beside its file."""
    return run_file.with_suffix(".partial")


def refuse_other_run(folder: Path, record: dict, settings: dict, now: str) -> None:
    """A run continues only at the commit and with the settings it started with: one run, one computation."""
    started = record["env_before"]["commit"]
    if started != now:
        raise SystemExit(f"{folder} holds a run started at commit {started}, and this checkout is at {now}: a run "
                         f"trains at one commit. Continue it from a checkout of {started.removesuffix('+dirty')} "
                         f"(git worktree add <dir> {started.removesuffix('+dirty')}), or delete {folder} to start it "
                         f"over")
    if record["settings"] != settings:
        raise SystemExit(f"{folder} holds a run started with other settings ({record['settings']}); finish it with "
                         f"those, or delete {folder} to start it over")


def _check_partial(run_file: Path, settings: dict) -> None:
    """Before a run starts: an unfinished one of the same name must be continuable here (refused in one line)."""
    folder = partial_folder(run_file)
    records = sorted(folder.glob("epoch-*.json"), key=lambda f: int(f.stem.removeprefix("epoch-")))
    if records:
        refuse_other_run(folder, json.loads(records[-1].read_text()), settings, commit())


def stopped_paused(todo: list, args) -> bool:
    """Whether some run of ``todo`` has no file yet (paused by ``--pause-after``); if so, says which, once."""
    waiting = [f"{m} seed {s}" for m, s, *own in todo if not _run_file(own[0] if own else args, m, s).exists()]
    if waiting:
        print(f"paused, to continue with the same command: {', '.join(waiting)}")
    return bool(waiting)


def _settings(args) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
            "train_subset": args.train_subset, "split_seed": args.split_seed, "validation": VALIDATION,
            "model": args.model, "eval_subset": args.eval_subset, "cuts": args.cuts}


def _run_all(todo: list[tuple[str, int]], args) -> None:
    """Every (method, seed) in its own process, ``args.jobs`` at a time; each result file is written as it ends.
    An item may carry its own arguments, ``(method, seed, run_args)`` (runs of several lengths side by side)."""
    running, queue = [], started_first(todo, args)
    while queue or running:
        while queue and len(running) < args.jobs:
            name, seed, *own = queue.pop(0)
            run_args = own[0] if own else args
            out = _run_file(run_args, name, seed)
            _check_partial(out, _settings(run_args))
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


def started_first(todo: list, args) -> list:
    """``todo`` with the runs that have kept a state first (in their order), then the others: a run under way
    finishes before a new one starts, so that fewer unfinished states wait (each is tens of MB, on this disk only)."""
    def under_way(item) -> bool:
        name, seed, *own = item
        return partial_folder(_run_file(own[0] if own else args, name, seed)).exists()

    return sorted(todo, key=lambda item: not under_way(item))


def _forwarded(args, seed: int) -> list[str]:
    out = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(seed), "--threads", str(args.threads), "--split-seed", str(args.split_seed),
           "--time-steps", str(args.time_steps), "--model", args.model]
    for flag, value in (("--train-subset", args.train_subset), ("--eval-subset", args.eval_subset)):
        if value:
            out += [flag, str(value)]
    if args.cuts:
        out += ["--cuts", *args.cuts]
    if args.pause_after:
        out += ["--pause-after", str(args.pause_after)]
    if args.data:
        out += ["--data", args.data]
    return out


def _child(args) -> None:
    if args.time_steps:
        started = environment(args.threads)
        result = time_method(args.child, args)
    else:
        result = run_method(args.child, args)
        if "paused_after" in result:
            return
        started = result.pop("env_before")  # where the run began, if it was paused or killed on the way
    payload = {**result, "settings": _settings(args), "commit": started["commit"], "env_before": started,
               "env": environment(args.threads), "command": " ".join(["python", *sys.argv])}
    write_json(args.child_out, payload)
    shutil.rmtree(partial_folder(args.child_out), ignore_errors=True)


# ---------------------------------------------------------------- the table


def check_counts(args) -> None:
    refuse_bad_arguments("accuracy_fashion_mnist.py", args, counts=("jobs", "threads", "epochs", "batch_size",
                                                                        "pause_after"))


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
    parser.add_argument("--pause-after", type=int, default=None, metavar="N",
                        help="train at most N more epochs of each run in this call; an unfinished run keeps its "
                             "state and the next call continues it (as it does a run that was killed)")
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
    if stopped_paused(todo, args):
        return None
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
