"""Time to accuracy on one machine (``--hosts 1``): backprop (one process, all cores) against an lfnnify pipeline
(K processes), over several seeds.

Both methods run `lfnnify train` on the same recipe (timm resnet18, in_chans=1; for a seed, the same
initialisation, data order, optimizer, schedule and iterations); the pipeline is started with torchrun, one thread
per process, in the mode given (--mode local: LFNN-ℓ; --mode replay: delayed end-to-end gradients, with --stash
and --delay-lr-warmup as options). Test accuracy is measured every --eval-every iterations. For each seed the
target is backprop's final accuracy on that seed; the result is the training time (evaluations excluded) at which
the pipeline first reaches it, against backprop's own, per seed and as mean ± sd over the seeds that reached it.
Speed that costs accuracy is not speed.

It also projects a K=4 run on four devices for each seed: the iterations the pipeline needed here, at the slowest
block's step time measured in one process for a K=4 split (once per sweep, kept in --runs), against backprop's
iterations at its one-process step time (both at --cores threads); K=4 may need more iterations than K=2 (longer
delays).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..common import environment, hardware_tag, mean_sd, mean_sd_text, ratios_text, time_to_target, write_json
from . import sweep

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"
METHODS = ("bp", "pipeline")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(name: str, args, seed: int, out: Path) -> tuple[list[str], dict]:
    """The command line and environment of one run: backprop in one process, or the pipeline under torchrun."""
    pipeline = name == "pipeline"
    sets = [f"model.name={args.model}", f"train.epochs={args.epochs}", f"train.seed={seed}",
            f"train.eval_every={args.eval_every}", f"data.batch_size={args.batch}", "train.checkpoint_every=100000",
            f"convert.blocks={args.blocks}",
            f"train.threads={1 if pipeline else args.cores}", f"convert.mode={args.mode}",
            f"convert.weight_stashing={str(args.stash).lower()}"]
    if pipeline and args.delay_lr_warmup:
        sets.append(f"train.delay_lr_warmup={args.delay_lr_warmup}")
    if not pipeline:
        sets.append("method=bp")
    sets += [f"data.{k}={v}" for k, v in (("train_subset", args.train_subset), ("eval_subset", args.eval_subset))
             if v is not None]
    cli = ["train", str(RECIPE), "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    if pipeline:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(args.blocks),
               "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "lfnnify", *cli]
    else:
        cmd = [sys.executable, "-m", "lfnnify", *cli]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1" if pipeline else str(args.cores)}


def run(name: str, args, seed: int) -> dict:
    """One method, one seed: its evaluations (step, training seconds, test accuracy)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd, env = command(name, args, seed, out)
        print(f"{name}-seed{seed}: {' '.join(cmd[1:])}", flush=True)
        load = os.getloadavg()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}, seed {seed}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    for r in evals:
        print(f"  step {r['step']:5d}  {r['train_seconds']:7.1f} s  test accuracy {r['accuracy']:.4f}", flush=True)
    return {"evaluations": [{k: r[k] for k in ("step", "train_seconds", "accuracy")} for r in evals],
            "load_before": load}


def measure(args) -> None:
    """The sweep, its summary and its files (``args`` as ``benchmarks.time_to_accuracy`` settled them)."""
    env_before = environment()
    mode = args.mode + ("-stash" if args.stash else "") + ("-delay-lr" if args.delay_lr_warmup else "")
    stem = args.name or (f"time_to_accuracy-fashion_mnist-{args.model}-k{args.blocks}-{mode}-{hardware_tag()}-"
                         f"{env_before['date'][:10]}")
    folder = args.runs or args.out / f"{stem}-runs"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("runs", "name", "out", "seeds", "allow_dirty")}
    runs = sweep(folder, settings, env_before["commit"], args.seeds, list(METHODS),
                 lambda name, seed: run(name, args, seed))
    summary = time_to_target(runs, args.seeds, list(METHODS), baseline="bp")
    projected = project_k4(args, summary, args.seeds, block_times(args, folder))
    payload = {
        "experiment": "time_to_accuracy_fashion_mnist",
        "settings": settings,
        "seeds": args.seeds,
        "pipeline_mode": mode,
        "target_rule": "per seed, backprop's final test accuracy on that seed",
        "runs": runs,
        "summary": summary,
        "projected_k4": projected,
        "env_before": env_before,
        "env": environment(),
        "command": " ".join(["python -m benchmarks.time_to_accuracy", *sys.argv[1:]]),
    }
    path = write_json(args.out / f"{stem}.json", payload)
    (args.out / f"{stem}.md").write_text(markdown(payload) + "\n")
    print("\n" + markdown(payload) + f"\nwrote {path}")


def markdown(payload: dict) -> str:
    s, summary, seeds = payload["settings"], payload["summary"], payload["seeds"]
    per = [summary["per_seed"][seed] for seed in seeds]
    head = (f"One machine ({payload['env']['device']}): backprop in one process at {s['cores']} threads against the "
            f"{payload['pipeline_mode']} pipeline, K={s['blocks']} processes of one thread; Fashion-MNIST, timm "
            f"{s['model']}, {s['epochs']} epoch(s)"
            + (f" of {s['train_subset']} training images" if s["train_subset"] else "")
            + f"; test accuracy every {s['eval_every']} steps; seeds {seeds}; commit {payload['env_before']['commit']}")
    ratio = summary["ratio_to_bp"]["pipeline"]
    spread = ("" if ratio["ratio_mean"] is None else
              f"; mean {ratio['ratio_mean']:.2f}x" + (f" ± {ratio['ratio_sd']:.2f}" if ratio["ratio_sd"] else ""))
    lines = [head, "", "| method | final test accuracy | s per step (training) | time to backprop's final accuracy, "
             "/ backprop's |", "|---|---|---|---|",
             f"| backprop | {mean_sd_text(summary['final_accuracy']['bp'])} | "
             f"{mean_sd_text(summary['seconds_per_step']['bp'], 2)} | 1 (the target is its own final accuracy) |",
             f"| {payload['pipeline_mode']} pipeline | {mean_sd_text(summary['final_accuracy']['pipeline'])} | "
             f"{mean_sd_text(summary['seconds_per_step']['pipeline'], 2)} | "
             f"{ratios_text([r['pipeline']['ratio_to_bp'] for r in per])} (per seed; reached on {ratio['reached']}"
             f"{spread}) |"]
    k4 = payload["projected_k4"]
    if k4["ratio"]["values"]:
        lines += ["", f"- projected on 4 devices (K=4): {mean_sd_text(k4['ratio'], 2)}x backprop's time to the target "
                      f"over the seeds the pipeline reached it on ({k4['note']})"]
    return "\n".join(lines)


def block_times(args, folder: Path) -> dict:
    """Per-block step times of a K=4 split of the model, at the training batch and --cores threads: measured once
    per sweep and kept in the runs folder with what they were measured for, so a resumed sweep does not measure
    again."""
    path = folder / "projection.json"
    measured_for = {"model": args.model, "batch": args.batch, "cores": args.cores}
    if path.exists():
        kept = json.loads(path.read_text())
        if kept["measured_for"] == measured_for:
            print(f"per-block step times of a K=4 split, measured before: {path}", flush=True)
            return kept["times"]
    import lfnnify
    from lfnnify.app import create_model

    cuts = lfnnify.plan(create_model(args.model, num_classes=10), blocks=4,
                        example_input=torch.zeros(1, 3, 28, 28)).cuts
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "projection.json"
        cmd = [sys.executable, "-m", "benchmarks.workers.speedup", "--method", "projection",
               "--model", args.model, "--size", "28", "--batch", str(args.batch), "--blocks", "4", "--cuts", *cuts,
               "--threads", str(args.cores), "--warmup", "2", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.cores)})
        times = json.loads(out.read_text())
    write_json(path, {"times": times, "measured_for": measured_for, "cuts": cuts})
    return times


def project_k4(args, summary: dict, seeds: list[int], times: dict) -> dict:
    """Projected K=4 time to the target per seed: the pipeline's iterations to it at the slowest K=4 block's step
    time, against backprop's iterations to it at its one-process step time (the sum of the blocks')."""
    bp_step = sum(times["block_fwd_bwd_s"])
    slowest = max(times["block_replay_step_s" if args.mode == "replay" else "block_lfnn_step_s"])
    per_seed = {}
    for seed in seeds:
        row = summary["per_seed"][seed]
        bp_steps, lf_steps = row["bp_step"], row["pipeline"]["step"]
        per_seed[seed] = {"bp_steps": bp_steps, "pipeline_steps": lf_steps,
                          "ratio": bp_steps * bp_step / (lf_steps * slowest) if lf_steps else None}
    reached = [r["ratio"] for r in per_seed.values() if r["ratio"] is not None]
    return {"bp_step_s": bp_step, "slowest_block_step_s": slowest, "per_seed": per_seed,
            "ratio": mean_sd(reached) if reached else {"mean": None, "sd": None, "values": []},
            "note": f"the pipeline's iterations at the slowest K=4 block's {slowest * 1e3:.0f} ms against backprop's "
                    f"at {bp_step * 1e3:.0f} ms, per-block times at {args.cores} threads, transfers not counted; "
                    f"iterations from this K={args.blocks} run (K=4 delays are longer)"}
