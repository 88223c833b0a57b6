"""The leaderboard users choose a mode from: test error per epoch of every mode on Fashion-MNIST.

Same model (timm resnet18, in_chans=1, K=4 where it applies), seed, data order, augmentation, optimizer and
epochs for every row: SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine decay over all steps, batch 128,
random crop 28 (padding 2) + horizontal flip, one thread per row. Each row runs in its own process (so its
peak memory is its own); ``--jobs 2`` runs two rows side by side.

Rows: backprop; LFNN-ℓ with the paper's heads (GAP + linear), with look-ahead heads, and with filter-wise
workers; Eq. 1 (``mode="lfnn"``); delayed end-to-end gradients (``mode="replay"``) without and with the local
loss; local for the first epoch, then replay.

Reproduce:  python benchmarks/accuracy_fashion_mnist.py --epochs 3 --jobs 2
Reuse rows measured earlier with unchanged code: --reuse results/accuracy_fashion_mnist-resnet18-cpu2-2026-11-26.json
(rows of this script's own result files are reused by name)
Quick look: python benchmarks/accuracy_fashion_mnist.py --epochs 1 --train-subset 2000 --methods bp replay
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, hardware_tag, peak_rss_bytes, write_json  # noqa: E402

# name -> (label, convert knobs, trainer knobs); None = plain backprop, written out by hand
REFRESH = {"refresh_heads_every": 10, "refresh_momentum": 0.9}  # an EMA of about 0.99 per step, as MAN uses
METHODS = {
    "bp": ("backprop", None, {}),
    "local": ("LFNN-ℓ, GAP+linear heads (the paper)", dict(blocks=4), {}),
    "local_lookahead": ("LFNN-ℓ, look-ahead heads (next stage)", dict(blocks=4, head="lookahead"), {}),
    "local_lookahead_layer": ("LFNN-ℓ, look-ahead heads (next layer)", dict(blocks=4, head="lookahead-layer"), {}),
    "local_lookahead_refresh": ("LFNN-ℓ, look-ahead heads (next stage), refreshed every 10 steps, momentum 0.9",
                                dict(blocks=4, head="lookahead"), REFRESH),
    "local_lookahead_layer_refresh": ("LFNN-ℓ, look-ahead heads (next layer), refreshed every 10 steps, momentum 0.9",
                                      dict(blocks=4, head="lookahead-layer"), REFRESH),
    "filterwise": ("LFNN-ℓ, 4 filter-wise workers, δ=0.7", dict(blocks=4, workers=4, leaders=0.7), {}),
    "lfnn_eq1": ("LFNN, Eq. 1 (global loss kept; not pipeline-capable)", dict(blocks=4, mode="lfnn"), {}),
    "replay": ("replay, no local loss", dict(blocks=4, mode="replay"), {}),
    "replay_local": ("replay + 0.3 × local loss", dict(blocks=4, mode="replay", local_weight=0.3), {}),
    "replay_stash": ("replay, weight stashing", dict(blocks=4, mode="replay", weight_stashing=True), {}),
    "local_then_replay": ("local for epoch 1, then replay", dict(blocks=4), {"switch_to": "replay",
                                                                             "switch_epochs": 1}),
}
# rows of the 2026-11-26 results whose code is unchanged (checked: the first 20 losses of LFNN-ℓ K=4 are
# bit-identical before and after the trainer redesign; backprop is a plain torch loop)
REUSABLE = {"bp": "bp", "local": "lfnn_k4"}
PIPELINE_CAPABLE = {"local", "local_lookahead", "local_lookahead_layer", "local_lookahead_refresh",
                    "local_lookahead_layer_refresh", "filterwise", "replay", "replay_local",
                    "replay_stash", "local_then_replay"}


def _optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def _datasets(args):
    from torch.utils.data import Subset

    from lfnnify.data import FashionMNIST

    train = FashionMNIST(args.data, train=True, augment=True)
    if args.train_subset:
        train = Subset(train, range(args.train_subset))
    return train, FashionMNIST(args.data, train=False)


def time_method(name: str, args) -> dict:
    """Seconds per training step of one row, alone on one thread: ``args.time_steps`` steps after 3 warm-up."""
    import timm

    import lfnnify
    from lfnnify.data import make_loader

    torch.set_num_threads(args.threads)
    train, _ = _datasets(args)
    torch.manual_seed(args.seed)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    _, knobs, trainer_knobs = METHODS[name]
    if knobs is None:
        opt = _optimizer(model.parameters(), args.lr)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        net = lfnnify.convert(model, **knobs, example_input=torch.zeros(1, 1, 28, 28))
        switch = {"switch_to": trainer_knobs["switch_to"], "switch_mode_at": 0} if "switch_to" in trainer_knobs else {}
        trainer = lfnnify.Trainer(net, optimizer=lambda ps: _optimizer(ps, args.lr), progress=False, **switch)
        step = trainer.train_step
    loader.sampler.set_epoch(0)
    times = []
    for i, (x, y) in enumerate(loader):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
        if i + 1 == 3 + args.time_steps:
            break
    timed = sorted(times[3:])
    return {"step_seconds": times[3:], "median_step_s": timed[len(timed) // 2], "steps_per_epoch": len(loader),
            "peak_rss_bytes": peak_rss_bytes()}


def run_method(name: str, args) -> dict:
    """One row, in this process: train ``args.epochs`` epochs, evaluate after each."""
    import timm

    import lfnnify
    from lfnnify.data import make_loader

    torch.set_num_threads(args.threads)
    train, test = _datasets(args)
    torch.manual_seed(args.seed)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    model_params = sum(p.numel() for p in model.parameters())
    train_loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    test_loader = make_loader(test, batch_size=512, shuffle=False)
    total_steps = args.epochs * len(train_loader)
    errors, epoch_seconds = [], []
    _, knobs, trainer_knobs = METHODS[name]
    if knobs is None:
        opt = _optimizer(model.parameters(), args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
        for epoch in range(args.epochs):
            train_loader.sampler.set_epoch(epoch)
            model.train()
            start = time.perf_counter()
            for x, y in train_loader:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
            epoch_seconds.append(time.perf_counter() - start)
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in test_loader:
                    correct += (model(x).argmax(1) == y).sum().item()
                    total += len(y)
            errors.append(100 * (1 - correct / total))
            print(f"  {name} epoch {epoch + 1}: test error {errors[-1]:.2f}% ({epoch_seconds[-1]:.0f} s)", flush=True)
        return {"test_error": errors, "epoch_seconds": epoch_seconds, "head_params": 0, "model_params": model_params,
                "peak_rss_bytes": peak_rss_bytes()}

    net = lfnnify.convert(model, **knobs, example_input=torch.zeros(1, 1, 28, 28))
    switch = {}
    if "switch_to" in trainer_knobs:
        switch = {"switch_to": trainer_knobs["switch_to"],
                  "switch_mode_at": trainer_knobs["switch_epochs"] * len(train_loader)}
    refresh = {k: v for k, v in trainer_knobs.items() if k.startswith("refresh_")}
    trainer = lfnnify.Trainer(
        net,
        optimizer=lambda ps: _optimizer(ps, args.lr),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps),
        progress=False,
        **switch,
        **refresh,
    )
    block_errors = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        trainer.fit(train_loader, epochs=epoch + 1)
        epoch_seconds.append(time.perf_counter() - start)
        metrics = trainer.evaluate(test_loader)
        errors.append(100 * (1 - metrics["accuracy"]))
        block_errors.append([100 * (1 - a) for a in metrics["block_accuracy"]])
        print(f"  {name} epoch {epoch + 1}: test error {errors[-1]:.2f}% (heads: "
              f"{', '.join(f'{e:.1f}' for e in block_errors[-1][:-1])}) ({epoch_seconds[-1]:.0f} s)", flush=True)
    return {"test_error": errors, "block_test_error": block_errors, "epoch_seconds": epoch_seconds,
            "cuts": net.plan.cuts, "head_params": net.plan.total_head_params, "model_params": model_params,
            "head_flops": [b.head_flops for b in net.plan.blocks], "leadership": trainer.leadership,
            "peak_rss_bytes": peak_rss_bytes()}


def _run_rows(names: list[str], args) -> dict:
    """Every row in its own process, ``args.jobs`` at a time; returns their results by name."""
    results, running = {}, []
    queue = list(names)
    with tempfile.TemporaryDirectory() as tmp:
        while queue or running:
            while queue and len(running) < args.jobs:
                name = queue.pop(0)
                part = Path(tmp) / f"{name}.json"
                cmd = [sys.executable, __file__, "--child", name, "--child-out", str(part), *_forwarded(args)]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                print(f"{name}: started", flush=True)
                running.append((name, part, subprocess.Popen(cmd, env=env), os.getloadavg()))
            time.sleep(2)
            for item in list(running):
                name, part, proc, load = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed with exit code {proc.returncode}")
                results[name] = {**json.loads(part.read_text()), "load_before": load, "load_after": os.getloadavg()}
    return results


def _forwarded(args) -> list[str]:
    out = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--seed", str(args.seed), "--threads", str(args.threads), "--time-steps", str(args.time_steps)]
    if args.train_subset:
        out += ["--train-subset", str(args.train_subset)]
    if args.data:
        out += ["--data", args.data]
    return out


def _reused(path: Path, names: list[str]) -> dict:
    old = json.loads(path.read_text())
    rows = {}
    for name in names:
        key = name if name in old["methods"] else REUSABLE.get(name)  # this script's rows, or the 2026-11-26 ones
        if key and key in old["methods"]:
            row = dict(old["methods"][key])
            row.setdefault("reused_from", str(path.name))  # where it was measured first
            row.setdefault("reused_env", old.get("env"))
            rows[name] = row
    return rows


def table(results: dict, epochs: int, today: str = "") -> str:
    head = "| method | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + \
        " | heads' params (share) | s/epoch | peak RSS |\n|---|" + "---|" * (epochs + 3)
    lines = [head]
    for name, r in results.items():
        share = r.get("head_params", 0) / r["model_params"] * 100 if r.get("model_params") else 0.0
        peak = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if r.get("peak_rss_bytes") else "–"
        errors = " | ".join(f"{e:.2f}" for e in r["test_error"])
        source = r.get("reused_from", "")
        tag = f" (measured {source[-15:-5]})" if source and today and today not in source else ""
        seconds = r.get("clean_s_per_epoch") or sum(r["epoch_seconds"]) / len(r["epoch_seconds"])
        if r.get("clean_peak_rss_bytes"):
            peak = f"{r['clean_peak_rss_bytes'] / 2**30:.2f} GiB"
        lines.append(f"| {METHODS[name][0]}{tag} | {errors} | {r.get('head_params', 0):,} ({share:.1f}%) | "
                     f"{seconds:.0f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="rows run side by side (one process each)")
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    parser.add_argument("--reuse", type=Path, nargs="+", default=[],
                        help="take rows measured with unchanged code from these JSON files (the first that has a row)")
    parser.add_argument("--name", default=None, help="result file stem (default: experiment, model, hardware, date)")
    parser.add_argument("--time-steps", type=int, default=0,
                        help="only time each row: this many steps after 3 warm-up, one row at a time")
    parser.add_argument("--timing", type=Path, default=None,
                        help="a --time-steps result: its clean seconds per step fill the s/epoch column")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = time_method if args.time_steps else run_method
        args.child_out.write_text(json.dumps(run(args.child, args)))
        return
    if args.time_steps:  # one row after another, nothing beside them: clean seconds per step
        args.jobs = 1
        timings = _run_rows(args.methods, args)
        stem = args.name or f"accuracy_fashion_mnist-timing-{hardware_tag()}-{environment()['date'][:10]}"
        write_json(args.out / f"{stem}.json", {"experiment": "accuracy_fashion_mnist timing", "methods": timings,
                                               "env": environment(args.threads),
                                               "command": " ".join(["python", *sys.argv])})
        for name, t in timings.items():
            print(f"{METHODS[name][0]:<55} {t['median_step_s'] * 1e3:7.0f} ms/step  "
                  f"{t['median_step_s'] * t['steps_per_epoch']:6.0f} s/epoch (one thread)")
        return

    from lfnnify.plots import plot_curves

    env = environment(args.threads)
    reused = {}
    for path in args.reuse:
        reused = {**_reused(path, args.methods), **reused}
    measured = _run_rows([m for m in args.methods if m not in reused], args)
    results = {m: (reused.get(m) or measured[m]) for m in args.methods}
    if args.timing:  # clean one-thread step times, measured alone, for the s/epoch column
        timing = json.loads(args.timing.read_text())["methods"]
        for m, r in results.items():
            if m in timing:
                r["clean_s_per_epoch"] = timing[m]["median_step_s"] * timing[m]["steps_per_epoch"]
                r["clean_peak_rss_bytes"] = timing[m]["peak_rss_bytes"]
    pipeline = {m: r for m, r in results.items() if m in PIPELINE_CAPABLE}
    best = min(pipeline, key=lambda m: pipeline[m]["test_error"][-1]) if pipeline else None
    payload = {
        "experiment": "accuracy_fashion_mnist",
        "model": "timm resnet18 (in_chans=1, num_classes=10), K=4",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "methods": results,
        "labels": {m: METHODS[m][0] for m in results},
        "best_pipeline_capable": best,
        "env_before": env,
        "env": environment(args.threads),
        "command": " ".join(["python", "benchmarks/accuracy_fashion_mnist.py", *sys.argv[1:]]),
    }
    stem = args.name or f"accuracy_fashion_mnist-resnet18-k4-{hardware_tag()}-{env['date'][:10]}"
    path = write_json(args.out / f"{stem}.json", payload)
    plot_curves({METHODS[n][0]: r["test_error"] for n, r in results.items()}, args.out / f"{stem}.png",
                title="Fashion-MNIST, timm resnet18, K=4: test error per epoch")
    print("\n" + table(results, args.epochs, env["date"][:10]))
    if best:
        gap = results[best]["test_error"][-1] - results["bp"]["test_error"][-1] if "bp" in results else float("nan")
        print(f"\nbest pipeline-capable mode: {METHODS[best][0]} ({gap:+.2f} points against backprop)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
