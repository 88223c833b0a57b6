"""What a block's replicas send to average their gradients, plain and through PowerSGD: bytes measured per step.

A pipeline of K blocks x R replicas (``torchrun --nproc-per-node 4``: 2 blocks x 2 replicas, on this machine over
loopback) trains a few steps of timm resnet18 (CIFAR variant, 32 px, each replica's batch 32: the multi-host
benchmark's global batch of 64) at the multi-host benchmark's cut, once with one all-reduce of the whole gradient
(``replicas_powersgd_rank=None``) and once per PowerSGD rank (``replicas_powersgd_rank=r``, compressing from step
``--start``). Every all-reduce and broadcast on each block's replica group is counted as it is called
(benchmarks/workers/replicas_traffic.py), step by step, and set beside what torch's PowerSGD rule says it should
send (``lfnnify.surgery.powersgd_elements`` of the shapes the average was given) and beside the activation
the block sends across its cut.

Time is not measured: two blocks of two replicas need four hosts of their own, and this machine has two cores. The
seconds a step's averaging would take on a link are projected from the bytes (each of two replicas sends the
all-reduced tensor once, and the first replica its BatchNorm statistics), and say what PowerSGD buys there.

Reproduce:  python -m benchmarks.replicas_traffic --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import RESULTS, environment, hardware_tag, refuse_uncommitted, write_json

CUTS = ["layer3.0"]  # the multi-host benchmark's time-balanced split of resnet18 at 32 px (its result files)
RANKS = (1, 2, 4)
LINKS = {"10mbit": 10e6, "100mbit": 100e6, "1gbit": 1e9, "10gbit": 10e9}


def launch(args, rank: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "counts.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
               "--master-addr", "127.0.0.1", "--master-port", str(args.port), "--max-restarts", "0",
               "-m", "benchmarks.workers.replicas_traffic", "--model", args.model, "--size", str(args.size),
               "--batch", str(args.batch), "--cuts", *args.cuts, "--mode", args.mode,
               "--powersgd-start", str(args.start), "--steps", str(args.steps), "--out", str(out)]
        if rank is not None:
            cmd += ["--powersgd-rank", str(rank)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise SystemExit(f"replicas_traffic: the run with powersgd rank {rank} failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return {"command": " ".join(cmd[1:]), **json.loads(out.read_text())}


def summary(run: dict, rank: int | None, start: int) -> dict:
    """Per block: what its first replica all-reduced and broadcast per step from ``start`` on (every step alike, or the
    median), and what PowerSGD's rule (or a plain all-reduce) says it should all-reduce."""
    from lfnnify.surgery import powersgd_elements

    blocks = {}
    for entry in run["ranks"]:
        if entry["replica"] != 0:
            continue
        steady = entry["per_step"][start:]
        shapes = entry["averaged_shapes"][-1]
        elements = sum(math.prod(s) for s in shapes) if rank is None else powersgd_elements(shapes, rank)
        blocks[entry["block"]] = {
            "all_reduce_bytes_per_step": statistics.median(s["all_reduce"] for s in steady),
            "all_reduce_bytes_range": [min(s["all_reduce"] for s in steady), max(s["all_reduce"] for s in steady)],
            "broadcast_bytes_per_step": statistics.median(s["broadcast"] for s in steady),
            "expected_all_reduce_bytes": 4 * elements,
            "gradient_bytes": 4 * sum(math.prod(s) for s in shapes),
            "steps_counted": len(steady),
        }
    return blocks


def activations(args) -> list[int]:
    """Bytes each cut sends forward per step at one replica's batch (plan().traffic; replay sends as much back)."""
    import torch

    import lfnnify
    from lfnnify.app import create_model

    model = create_model(args.model, num_classes=10, cifar=True)
    plan = lfnnify.plan(model, cuts=args.cuts, example_input=torch.zeros(1, 3, args.size, args.size),
                        batch_size=args.batch)
    return plan.traffic.cut_bytes


def markdown(payload: dict) -> str:
    s = payload["settings"]
    rows = payload["results"]
    lines = [f"A pipeline of 2 blocks x 2 replicas ({payload['env']['device']}, over loopback): timm {s['model']} "
             f"(CIFAR variant, {s['size']} px), each replica's batch {s['batch']}, cut {s['cuts']}, mode {s['mode']}; "
             f"what each block's replicas all-reduce per step from step {s['start']} on (measured / PowerSGD's rule), "
             f"and the seconds a replica's share of it would take on a link (projected: bytes / rate)", "",
             "| block | average | MB all-reduced per step (measured / expected) | BatchNorm broadcast MB | "
             + " | ".join(f"s/step at {r}" for r in LINKS) + " |",
             "|---|---|---|---|" + "---|" * len(LINKS)]
    for name, blocks in rows.items():
        for block, b in sorted(blocks.items(), key=lambda kv: int(kv[0])):
            sent = b["all_reduce_bytes_per_step"] + b["broadcast_bytes_per_step"]
            times = " | ".join(f"{sent * 8 / bits:.3f}" for bits in LINKS.values())
            lines.append(f"| {block} | {name} | {b['all_reduce_bytes_per_step'] / 1e6:.3f} / "
                         f"{b['expected_all_reduce_bytes'] / 1e6:.3f} | {b['broadcast_bytes_per_step'] / 1e6:.4f} | "
                         f"{times} |")
    cut = payload["activation_bytes_per_step"]
    lines += ["", "- The activation crossing each cut per step at this batch: "
              + ", ".join(f"cut {k}: {b / 1e6:.3f} MB" for k, b in enumerate(cut))
              + (" (replay sends its gradient back, as much again)" if s["mode"] == "replay" else "")]
    plain = rows["plain"]
    for name, blocks in rows.items():
        if name == "plain":
            continue
        cuts = ", ".join(f"block {k}: {plain[k]['all_reduce_bytes_per_step'] / b['all_reduce_bytes_per_step']:.0f}x"
                         for k, b in sorted(blocks.items(), key=lambda kv: int(kv[0])))
        lines.append(f"- {name} all-reduces less than the plain average by {cuts}")
    lines.append(f"- Measured at {payload['env']['commit']} on {payload['env']['date']}; time not measured (4 hosts "
                 f"needed, {payload['env']['cores']} cores here)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="each replica's batch")
    parser.add_argument("--cuts", nargs="+", default=CUTS)
    parser.add_argument("--mode", default="replay", choices=["local", "replay"])
    parser.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    parser.add_argument("--start", type=int, default=2, help="plain all-reduces before PowerSGD compresses")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--port", type=int, default=29731)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--allow-dirty", action="store_true")
    args = parser.parse_args()
    refuse_uncommitted("replicas_traffic.py", args.allow_dirty)
    if args.steps <= args.start or args.start < 2 or any(r < 1 for r in args.ranks):
        raise SystemExit(f"replicas_traffic.py: --start {args.start} --steps {args.steps} --ranks "
                         f"{' '.join(map(str, args.ranks))}: give --start >= 2, more --steps than that (the steps "
                         f"counted are those from --start on), and ranks >= 1")
    env_before = environment(1)
    results, commands = {}, {}
    for rank in (None, *args.ranks):
        name = "plain" if rank is None else f"powersgd_r{rank}"
        print(f"{name}: 2 blocks x 2 replicas, {args.steps} steps", flush=True)
        run = launch(args, rank)
        results[name] = summary(run, rank, args.start)
        commands[name] = run["command"]
        for block, b in sorted(results[name].items()):
            print(f"  block {block}: {b['all_reduce_bytes_per_step'] / 1e6:.3f} MB all-reduced per step "
                  f"(expected {b['expected_all_reduce_bytes'] / 1e6:.3f})", flush=True)
    payload = {"experiment": "replicas_traffic", "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                               for k, v in vars(args).items()},
               "results": results, "activation_bytes_per_step": activations(args), "launches": commands,
               "env_before": env_before, "env": environment(1), "command": " ".join(["python", "-m",
                                                                                    "benchmarks.replicas_traffic",
                                                                                    *sys.argv[1:]])}
    name = args.name or f"replicas_traffic-{args.model}-k2x2-{hardware_tag()}"
    write_json(args.out / f"{name}.json", payload)
    (args.out / f"{name}.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
