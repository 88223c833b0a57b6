"""Time to accuracy across a shaped link (``--hosts 2``): data-parallel backprop (DDP) against lfnnify's pipelines on
two hosts.

Two hosts of one core each (network and PID namespaces on this machine, lfnnify/app/testbed.py) joined by a link of
``--rate`` (1 Gbit/s by default, tc's token bucket), a real ``torchrun --nnodes 2`` on each. Every method trains the
default recipe's model (timm resnet18, in_chans=1, 28 px) on Fashion-MNIST for ``--epochs`` (1) of the first
``--train-subset`` training images, with the recipe's batch (128), SGD and cosine schedule, from the same seed and on
the same batches in the same order:

- ``ddp``: torch's DistributedDataParallel, one replica per host, each taking half of every batch
  (benchmarks.workers.exact_fashion_mnist, plain PyTorch);
- ``ddp_fp16``, ``ddp_powersgd_r{1,2,4}``, ``local_sgd_h{4,16}``: the same with the fp16 hook, PowerSGD (error feedback,
  warm start, compressing from step ``--hook-start``, 10 by default; one gradient bucket) or local SGD (plain DDP
  until that step, then the parameters averaged every 4 or 16 steps; rank 0's replica is the one evaluated);
- ``bp_<schedule>_m<M>``: backprop with exact gradients, the model split over the hosts and run by a
  ``torch.distributed.pipelining`` schedule over M micro-batches (GPipe and 1F1B: one stage per host, at the
  pipelines' cut; Interleaved 1F1B and Interleaved Zero Bubble: two stages per host, at a four-stage split chosen the
  same way); the same worker, plain PyTorch, rank 0 gathering the stages to evaluate (untimed);
- ``replay_pipeline``: ``lfnnify train``, delayed end-to-end gradients with weight stashing, one block per host;
- ``lfnn_pipeline``: ``lfnnify train``, LFNN-ℓ (local losses, the paper's heads), one block per host;
- ``*_int8``: the two pipelines sending int8 with a scale per channel (``pipeline.send_dtype=int8``);
- ``*_int8_deltas``: sending each sample's change since its last visit as int8 (``pipeline.send_deltas=true``,
  AQ-SGD): the same as ``*_int8`` in the first epoch, where no sample has been seen yet (give ``--epochs``).

Both pipelines cut where a K=2 split balanced by measured time puts the cut on this machine
(``plan(balance="time")`` at the training batch, one thread), measured once per sweep and kept in ``--runs``
(``cuts.json``). Test accuracy on the first ``--eval-subset`` test images every ``--eval-every`` steps; training
time excludes the evaluations (and checkpoints). For each seed the target is DDP's final accuracy; the result is the
training time at which each method first reaches it, against DDP's own; then the same for that accuracy less one
point, who got to each target first (``first_to_target``), each method's accuracy at a common budget of training time
(the seed's shortest whole run) and the bytes each sends per training sample (from ``plan()``). One file per run in
``--runs`` (reused when its settings and commit match), so an interrupted sweep goes on where it stopped.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lfnnify.app import Hosts

from ..common import (
    environment,
    hardware_tag,
    hosts_ready,
    mean_sd,
    mean_sd_text,
    ratios_text,
    time_balanced_plan,
    time_to_target,
    write_json,
)
from . import sweep
from .rate_map import step_seconds

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"
EXACT = ["-m", "benchmarks.workers.exact_fashion_mnist"]
METHODS = {  # name -> recipe overrides of the pipeline; the DDP variants' hook settings (plain PyTorch)
    "ddp": [],
    "ddp_fp16": ["--hook", "fp16"],
    **{f"ddp_powersgd_r{r}": ["--hook", "powersgd", "--powersgd-rank", str(r)] for r in (1, 2, 4)},
    **{f"local_sgd_h{h}": ["--hook", "local_sgd", "--local-sgd-every", str(h)] for h in (4, 16)},
    **{f"bp_{s}_m{m}": ["--schedule", s, "--microbatches", str(m)]
       for s in ("gpipe", "1f1b", "interleaved1f1b", "interleaved_zb") for m in (2, 4)},
    "replay_pipeline": ["convert.mode=replay", "convert.weight_stashing=true"],
    "lfnn_pipeline": ["convert.mode=local"],
    # the same, sending activations (and replay's gradients) as int8 with a scale per channel
    "replay_pipeline_int8": ["convert.mode=replay", "convert.weight_stashing=true", "pipeline.send_dtype=int8"],
    "lfnn_pipeline_int8": ["convert.mode=local", "pipeline.send_dtype=int8"],
    # the same, sending each sample's change since its last visit as int8 (AQ-SGD; the same after one epoch)
    "replay_pipeline_int8_deltas": ["convert.mode=replay", "convert.weight_stashing=true", "pipeline.send_dtype=int8",
                                    "pipeline.send_deltas=true"],
    "lfnn_pipeline_int8_deltas": ["convert.mode=local", "pipeline.send_dtype=int8", "pipeline.send_deltas=true"],
}
TARGET = ("replay_pipeline", 0.7)  # the target: replay reaches DDP's final accuracy in <= 0.7x DDP's training time


FOUR_STAGES = ("interleaved1f1b", "interleaved_zb")  # two stages per host: the model cut in four


def four_stages(name: str) -> bool:
    return name.startswith("bp_") and METHODS[name][1] in FOUR_STAGES


def sweep_cuts(args, folder: Path) -> tuple[list[str], list[str] | None]:
    """The splits every run of a sweep uses: in two (every method but the four-stage schedules) and, where a
    four-stage schedule runs, in four; each measured once (balance='time' at the training batch, one thread) and kept
    in the runs folder with what it was measured for, so a resumed sweep trains on the same split. A time balance
    can tip either way between two measurements, and runs on different splits are not the same runs."""
    path, measured_for = folder / "cuts.json", {"model": args.model, "batch": args.batch, "rate": args.rate}
    kept = json.loads(path.read_text()) if path.exists() else {}
    if kept.get("measured_for") != measured_for:
        kept = {"measured_for": measured_for}
    for key, blocks in (("cuts", 2), ("cuts4", 4)):
        if key in kept:
            print(f"the {blocks}-way split of this sweep, measured before: {kept[key]} (from {path})", flush=True)
        elif blocks == 2 or any(four_stages(m) for m in args.methods):
            link = None if args.rate == "unshaped" else args.rate  # plan() says what crosses a link of that rate
            plan = time_balanced_plan(args.model, batch=args.batch, example_shape=(1, 28, 28), link=link,
                                      blocks=blocks, in_chans=1)
            print(plan, flush=True)
            kept |= {key: plan.cuts, f"plan{blocks}": str(plan)}
            write_json(path, kept)
    return kept["cuts"], kept.get("cuts4")


def overrides(args, seed: int) -> list[str]:
    return [f"model.name={args.model}", f"data.train_subset={args.train_subset}",
            f"data.eval_subset={args.eval_subset}", f"data.batch_size={args.batch}", f"train.epochs={args.epochs}",
            f"train.seed={seed}", "train.threads=1", f"train.eval_every={args.eval_every}",
            "train.checkpoint_every=1000000", "convert.blocks=null", f"convert.cuts={json.dumps(args.cuts)}"]


def command(name: str, args, seed: int, out: Path) -> list[str]:
    if is_exact(name):
        flags = [x for s in overrides(args, seed) for x in ("--set", s)]
        stage_cuts = (["--stage-cuts", json.dumps(args.cuts4 if four_stages(name) else args.cuts)]
                      if name.startswith("bp_") else ["--hook-start", str(args.hook_start)])
        return [*EXACT, str(RECIPE), *flags, *METHODS[name], *stage_cuts, "--eval-every", str(args.eval_every),
                "--out", str(out)]
    flags = [x for s in [*overrides(args, seed), *METHODS[name]] for x in ("--set", s)]
    return ["-m", "lfnnify", "train", str(RECIPE), "--out", str(out), "--no-progress", *flags]


def is_exact(name: str) -> bool:
    """Whether ``name`` is exact-gradient backprop in plain PyTorch (DDP with or without a communication hook, or a
    pipelining schedule), not lfnnify."""
    return name.startswith(("ddp", "local_sgd", "bp_"))


def run(hosts: Hosts, name: str, args, seed: int, port: int) -> dict:
    """One method, one seed, across the two hosts: its evaluations (step, training seconds, test accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        logs = [open(Path(tmp) / f"host{i}.log", "w") for i in range(2)]  # noqa: SIM115 - closed below
        sent = [hosts.tx_bytes(i) for i in range(2)]
        start = time.monotonic()
        procs = [hosts.popen(i, hosts.torchrun(i, command(name, args, seed, out), port=port), stdout=logs[i],
                             stderr=logs[i]) for i in range(2)]
        for p in procs:
            try:
                p.wait(timeout=max(1.0, start + args.timeout - time.monotonic()))
            except Exception:  # noqa: BLE001 - a stuck run is killed and reported
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        wall = time.monotonic() - start
        tails = "".join((Path(tmp) / f"host{i}.log").read_text()[-2000:] for i in range(2))
        log = hosts.path(0, out / "log.jsonl")  # rank 0 keeps the log, on its own host's disk
        if [p.returncode for p in procs] != [0, 0] or not log.exists():
            raise SystemExit(f"{name}, seed {seed}: failed (exit {[p.returncode for p in procs]}):\n{tails}")
        evals = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "eval"]
    return {"evaluations": [{k: r[k] for k in ("step", "train_seconds", "accuracy")} for r in evals],
            "wall_seconds": wall, "bytes_sent": [hosts.tx_bytes(i) - sent[i] for i in range(2)]}


def summarise(runs: dict, seeds: list[int], methods: list[str]) -> dict:
    """Per seed: DDP's final accuracy as the target, and when each method first reached it; then over seeds. Also
    (``minus_one_point``) the same for DDP's final accuracy less one point, and (``at_budget``) each method's test
    accuracy at the last evaluation within a budget of training time: the shortest whole run of that seed, so that
    every method had that long."""
    ordered = [m for m in METHODS if m in methods]
    summary = time_to_target(runs, seeds, ordered, baseline="ddp")
    lower = time_to_target(runs, seeds, ordered, baseline="ddp", margin=0.01)
    summary["minus_one_point"] = {"per_seed": lower["per_seed"], "ratio_to_ddp": lower["ratio_to_ddp"]}
    budgets = {}
    for seed in seeds:
        evals = {m: runs[f"{m}-seed{seed}"]["evaluations"] for m in ordered}
        budget = min(e[-1]["train_seconds"] for e in evals.values())
        within = {m: [r for r in e if r["train_seconds"] <= budget * (1 + 1e-9)] for m, e in evals.items()}
        budgets[seed] = {"seconds": budget, "accuracy": {m: w[-1]["accuracy"] if w else None for m, w in
                                                         within.items()}}
    reached = {m: [b["accuracy"][m] for b in budgets.values()] for m in ordered}
    summary["at_budget"] = {"per_seed": budgets, "accuracy": {m: mean_sd(a) if None not in a else None
                                                              for m, a in reached.items()}}
    return summary


def seed_keys(summary: dict) -> dict:
    """``summary`` with its per-seed tables keyed by int seeds again (a JSON file keeps them as strings)."""
    def fixed(table):
        return {int(k): v for k, v in table.items()}

    out = {**summary, "per_seed": fixed(summary["per_seed"])}
    if "minus_one_point" in summary:
        out["minus_one_point"] = {**summary["minus_one_point"],
                                  "per_seed": fixed(summary["minus_one_point"]["per_seed"])}
    if "at_budget" in summary:
        out["at_budget"] = {**summary["at_budget"], "per_seed": fixed(summary["at_budget"]["per_seed"])}
    return out


def first_to_target(summary: dict, seeds: list[int]) -> dict:
    """Who reached each target first: for DDP's final accuracy (``final``) and that less one point
    (``minus_one_point``), each method's training seconds to it seed by seed, its mean where it reached it on every
    seed, and the methods in order (those that reached it on every seed by mean time, then the rest by how many seeds
    they reached it on). ``best_exact``: the first exact-gradient method (DDP and its hooks, or a schedule), ``split``:
    the first schedule (a split model's choices); each pipeline's mean time as a ratio of theirs."""
    methods = list(summary["final_accuracy"])
    out = {}
    for key, per_seed in (("final", summary["per_seed"]), ("minus_one_point", summary["minus_one_point"]["per_seed"])):
        seconds = {m: [per_seed[s]["ddp_seconds"] if m == "ddp" else per_seed[s][m]["seconds"] for s in seeds]
                   for m in methods}
        reached = {m: sum(v is not None for v in values) for m, values in seconds.items()}
        mean = {m: statistics.mean(v) for m, v in seconds.items() if None not in v}
        order = sorted(mean, key=mean.get) + sorted((m for m in methods if m not in mean), key=lambda m: -reached[m])
        row = {"seconds": seconds, "reached": reached, "mean_seconds": mean, "order": order}
        for case, pool in (("best_exact", [m for m in mean if is_exact(m)]),
                           ("split", [m for m in mean if m.startswith("bp_")])):
            best = min(pool, key=mean.get, default=None)
            row[case] = {"method": best, "pipelines": {m: mean[m] / mean[best] for m in mean if not is_exact(m)}
                         if best else {}}
        out[key] = row
    return out


def first_text(row: dict, seeds: int) -> str:
    """One target's order: 'm1 52 s, m2 640 s; not on every seed: m3 (1 of 3)', then each pipeline against the first
    exact-gradient method and the first schedule."""
    done = [f"{m} {row['mean_seconds'][m]:.0f} s" for m in row["order"] if m in row["mean_seconds"]]
    rest = [f"{m} ({row['reached'][m]} of {seeds})" for m in row["order"] if m not in row["mean_seconds"]]
    text = ", ".join(done) + ("; not on every seed: " + ", ".join(rest) if rest else "")
    for case, what in (("best_exact", "the first exact-gradient method"), ("split", "the first schedule")):
        best = row[case]
        repeated = case == "split" and best["method"] == row["best_exact"]["method"]
        if best["method"] and best["pipelines"] and not repeated:
            text += f"; against {what} ({best['method']}): " + ", ".join(
                f"{m} {r:.2f}×" for m, r in best["pipelines"].items())
    return text


def bytes_per_sample(args) -> dict[str, float]:
    """What each method sends across the link per training sample, both hosts together, from ``plan()``'s traffic
    (as benchmarks.multihost computes it, and measures it within 15%): training only, where the runs' own byte
    counts also hold their evaluations (a pipeline's test set crosses the link; a split model's weights are gathered
    for each evaluation)."""
    import torch

    from lfnnify.app import create_model

    from ..multihost import expected_bytes_of

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=1)
    expected, _, _ = expected_bytes_of(args.methods, model, torch.zeros(1, 1, 28, 28), cuts=args.cuts,
                                       cuts4=args.cuts4, batch=args.batch)
    return {m: b / args.batch for m, b in expected.items()}


def measure(args) -> None:
    """The sweep, its summary and its files (``args`` as ``benchmarks.time_to_accuracy`` settled them)."""
    if "ddp" not in args.methods and not args.step_times:
        raise SystemExit("time_to_accuracy: --methods must include ddp, whose final accuracy is the target (or pass "
                         "--step-times for short runs that only time the steps)")
    if args.hook_start < 2:
        raise SystemExit(f"time_to_accuracy: --hook-start {args.hook_start}: PowerSGD with error feedback starts "
                         f"compressing at step 2 at the earliest; give 2 or more")
    env_before = hosts_ready("time_to_accuracy")
    kind = "multihost_tta_steps" if args.step_times else "multihost_tta"
    stem = args.name or f"{kind}-fashion_mnist-{args.model}-k2-{args.rate}-{hardware_tag()}-{env_before['date'][:10]}"
    folder = args.runs or args.out / f"{stem}-runs"
    folder.mkdir(parents=True, exist_ok=True)
    args.cuts, args.cuts4 = sweep_cuts(args, folder)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("runs", "name", "out", "seeds", "methods", "timeout", "allow_dirty", "cuts4")}
    if settings["epochs"] == 1:  # the runs made before --epochs trained one epoch and say nothing: they still match
        del settings["epochs"]
    ports = itertools.count(29701)
    with Hosts(2, rate=args.rate) as hosts:
        def train(name: str, seed: int) -> dict:
            print(f"{name}-seed{seed}: training across {hosts.rate}", flush=True)
            result = run(hosts, name, args, seed, next(ports))
            last = result["evaluations"][-1]
            print(f"  {last['step']} steps in {last['train_seconds']:.0f} s of training "
                  f"({result['wall_seconds']:.0f} s in all): test accuracy {last['accuracy']:.4f}", flush=True)
            return result

        runs = sweep(folder, settings, env_before["commit"], args.seeds, args.methods, train)
        notes = hosts.notes
    if args.step_times:
        return step_times_files(args, stem, settings, runs, notes, env_before)
    summary = summarise(runs, args.seeds, args.methods)
    verdict = None
    if TARGET[0] in args.methods:
        m, bound = TARGET
        ratios = [summary["per_seed"][s][m]["ratio_to_ddp"] for s in args.seeds]
        verdict = (f"{m} reaches DDP's final accuracy in {ratios_text(ratios)} DDP's training time "
                   f"(target <= {bound}x: {'met' if all(r is not None and r <= bound for r in ratios) else 'MISSED'})")
    payload = {"experiment": "multihost_time_to_accuracy", "settings": settings, "seeds": args.seeds,
               "cuts": args.cuts, "cuts4": args.cuts4, "bytes_per_sample": bytes_per_sample(args),
               "cut_choice": "balance='time' at the training batch, one thread, on this machine",
               "runs": runs, "summary": summary, "verdict": verdict, "testbed_notes": notes,
               "env_before": env_before, "env": environment(1),
               "command": " ".join(["python -m benchmarks.time_to_accuracy", *sys.argv[1:]])}
    path = write_json(args.out / f"{stem}.json", payload)
    chart(payload, args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(markdown(payload) + "\n")
    print(markdown(payload) + f"\nwrote {path}")


def step_times_files(args, stem: str, settings: dict, runs: dict, notes: list, env_before: dict) -> None:
    """``--step-times``: the runs and each method's seconds per step from its first evaluation to its last (what
    ``benchmarks.time_to_accuracy.rate_map`` carries whole runs' steps to this rate with)."""
    payload = {"experiment": "multihost_time_to_accuracy_step_times", "settings": settings, "seeds": args.seeds,
               "cuts": args.cuts, "cuts4": args.cuts4, "runs": runs, "testbed_notes": notes,
               "env_before": env_before, "env": environment(1),
               "command": " ".join(["python -m benchmarks.time_to_accuracy", *sys.argv[1:]])}
    payload["step_seconds"] = step_seconds([payload])[args.rate]
    path = write_json(args.out / f"{stem}.json", payload)
    lines = [f"Seconds per training step across {args.rate} ({payload['env']['device']}), from each run's first "
             f"evaluation to its last (seed {args.seeds[0]}), commit {env_before['commit']}", "",
             "| method | s per step | over steps |", "|---|---|---|"]
    lines += [f"| {m} | {c['seconds_per_step']:.3f} | {c['steps'][0]}–{c['steps'][1]} |"
              for m, c in payload["step_seconds"].items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {path}")


def _epochs(settings: dict) -> str:
    n = settings.get("epochs", 1)
    return "one epoch" if n == 1 else f"{n} epochs"


def markdown(payload: dict) -> str:
    s, summary, seeds = payload["settings"], seed_keys(payload["summary"]), payload["seeds"]
    head = (f"2 hosts x 1 core ({payload['env']['device']}) joined by a {s['rate']} link; Fashion-MNIST, timm "
            f"{s['model']}, {_epochs(s)} of {s['train_subset']} training images, batch {s['batch']}, K=2 cut after "
            f"{payload['cuts']} (measured time); test accuracy on {s['eval_subset']} test images every "
            f"{s['eval_every']} steps; seeds {seeds}; commit {payload['env_before']['commit']}")
    if not summary:
        return head
    lower, budget = summary.get("minus_one_point"), summary.get("at_budget")
    sent = payload.get("bytes_per_sample") or {}
    columns = ["method", "final test accuracy", "s per step (training)", "time to DDP's final accuracy, / DDP's"]
    if lower:
        columns += ["time to DDP's final accuracy - 1 point, / DDP's", "test accuracy at the budget",
                    "kB per sample (plan)"]
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def ratios(per_seed, m):
        return ratios_text([per_seed[seed][m]["ratio_to_ddp"] for seed in seeds]) + " (per seed)"

    for m in [m for m in METHODS if m in summary["final_accuracy"]]:
        acc, speed = summary["final_accuracy"][m], summary["seconds_per_step"][m]
        cells = [m, mean_sd_text(acc), mean_sd_text(speed, 2),
                 "1 (the target is its own final accuracy)" if m == "ddp" else ratios(summary["per_seed"], m)]
        if lower:
            at = budget["accuracy"][m]
            cells += ["1" if m == "ddp" else ratios(lower["per_seed"], m),
                      mean_sd_text(at) if at else "no evaluation within it",
                      f"{sent[m] / 1e3:.1f}" if m in sent else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {payload['verdict']}"] if payload.get("verdict") else []
    if budget:
        notes.append("- The budget: each seed's shortest whole run, " + ", ".join(
            f"{budget['per_seed'][seed]['seconds']:.0f} s" for seed in seeds) + " of training; accuracy at the last "
            "evaluation within it.")
    if lower:
        first = first_to_target(summary, seeds)
        notes += [f"- First to DDP's final accuracy (mean training seconds over seeds): "
                  f"{first_text(first['final'], len(seeds))}.",
                  f"- First to DDP's final accuracy less one point: "
                  f"{first_text(first['minus_one_point'], len(seeds))}."]
    if sent:
        notes.append("- kB per sample: both hosts' sends per training sample, from plan()'s traffic (training only; "
                     "the runs' byte counts, in the JSON, also hold their evaluations).")
    return "\n".join(lines + [""] + notes)


def chart(payload: dict, path: Path) -> None:
    from lfnnify.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shown = [m for m in METHODS if any(r["method"] == m for r in payload["runs"].values())]
    colors = dict(zip(shown, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])))
    for key, r in payload["runs"].items():
        m = r["method"]
        xs = [0.0] + [e["train_seconds"] for e in r["evaluations"]]
        ys = [float("nan")] + [e["accuracy"] for e in r["evaluations"]]
        ax.plot(xs, ys, color=colors[m], alpha=0.8, lw=1.2, label=m if key.endswith(f"seed{payload['seeds'][0]}")
                else None)
    ax.set_xlabel("training time (s; evaluations excluded)")
    ax.set_ylabel("test accuracy")
    s = payload["settings"]
    ax.set_title(f"2 hosts x 1 core, {s['rate']} link, {s['model']} K=2, {_epochs(s)} of {s['train_subset']} images, "
                 f"one line per seed\n{payload['env']['device'][:60]}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
