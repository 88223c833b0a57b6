"""Time to accuracy on Fashion-MNIST: backprop (one process, all cores) against an lfnnify pipeline (K processes).

Both runs use `lfnnify train` on the same recipe (timm resnet18, in_chans=1; same data order, optimizer,
schedule and iterations); the pipeline run is started with torchrun, one thread per process, in the mode
given (--mode local: LFNN-ℓ; --mode replay: delayed end-to-end gradients). Test accuracy is measured every
--eval-every iterations; the training time (evaluations excluded) at which each run first reaches the
target (by default backprop's final accuracy) is compared. Speed that costs accuracy is not speed.

It also projects a K=4 run on four devices: the iterations the pipeline needed here, at the slowest
block's step time measured in one process for a K=4 split, against backprop's iterations at its one-process
step time (both at --cores threads), stating that K=4 may need more iterations than K=2 (longer delays).

Reproduce:  python benchmarks/time_to_accuracy.py --mode replay --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, hardware_tag, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, args, out: Path, *, pipeline: bool) -> list[dict]:
    sets = [f"train.epochs={args.epochs}", f"train.eval_every={args.eval_every}", "train.checkpoint_every=100000",
            f"convert.blocks={args.blocks}", f"train.threads={1 if pipeline else args.cores}",
            f"convert.mode={args.mode}", f"convert.weight_stashing={str(args.stash).lower()}"]
    if not pipeline:
        sets.append("method=bp")
    if args.train_subset:
        sets.append(f"data.train_subset={args.train_subset}")
    cli = ["train", str(RECIPE), "--out", str(out), "--no-progress", *[x for s in sets for x in ("--set", s)]]
    if pipeline:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(args.blocks),
               "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "lfnnify", *cli]
    else:
        cmd = [sys.executable, "-m", "lfnnify", *cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if pipeline else str(args.cores)}
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    load = os.getloadavg()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    for r in evals:
        print(f"  step {r['step']:5d}  {r['train_seconds']:7.1f} s  test accuracy {r['accuracy']:.4f}", flush=True)
    return [{"step": r["step"], "train_seconds": r["train_seconds"], "accuracy": r["accuracy"], "load_before": load}
            for r in evals]


def first_reaching(evals: list[dict], target: float):
    return next((r for r in evals if r["accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--target", type=float, default=None,
                        help="accuracy to reach (default: backprop's final accuracy)")
    parser.add_argument("--mode", default="replay", choices=["local", "replay"], help="the pipeline's mode")
    parser.add_argument("--stash", action="store_true", help="replay with weight stashing")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    env_before = environment()
    with tempfile.TemporaryDirectory() as tmp:
        bp = run("backprop, 1 process", args, Path(tmp) / "bp", pipeline=False)
        lf = run(f"{args.mode} pipeline, {args.blocks} processes", args, Path(tmp) / "lfnn", pipeline=True)
    target = args.target if args.target is not None else bp[-1]["accuracy"]
    hit_bp, hit_lf = first_reaching(bp, target), first_reaching(lf, target)
    ratio = hit_bp["train_seconds"] / hit_lf["train_seconds"] if hit_bp and hit_lf else None
    projected = project_k4(args, bp, hit_bp, hit_lf)
    payload = {
        "experiment": "time_to_accuracy_fashion_mnist",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_accuracy": target,
        "bp": {"evaluations": bp, "reached": hit_bp},
        "lfnn_pipeline": {"evaluations": lf, "reached": hit_lf},
        "speedup_time_to_target": ratio,
        "pipeline_mode": args.mode + (" (weight stashing)" if args.stash else ""),
        "projected_k4": projected,
        "final_accuracy": {"bp": bp[-1]["accuracy"], "lfnn_pipeline": lf[-1]["accuracy"]},
        "env_before": env_before,
        "env": environment(),
        "command": " ".join(["python", "benchmarks/time_to_accuracy.py", *sys.argv[1:]]),
    }
    stem = (f"time_to_accuracy-fashion_mnist-resnet18-k{args.blocks}-{args.mode}{'-stash' if args.stash else ''}-"
            f"{hardware_tag()}-{env_before['date'][:10]}")
    path = write_json(args.out / f"{stem}.json", payload)
    reached = (f"after {hit_lf['train_seconds']:.0f} s ({ratio:.2f}x backprop's speed to it)" if hit_lf else
               f"never within {args.epochs} epochs (best {max(r['accuracy'] for r in lf):.4f})")
    print(f"\ntarget test accuracy {target:.4f} (backprop's final): backprop reaches it after "
          f"{hit_bp['train_seconds']:.0f} s, the {args.mode} pipeline {reached}")
    if projected and projected.get("ratio"):
        print(f"projected on 4 devices (K=4): {projected['ratio']:.2f}x backprop's time to the target "
              f"({projected['note']})")
    print(f"wrote {path}")


def project_k4(args, bp, hit_bp, hit_lf) -> dict | None:
    """Projected K=4 time to the target: this run's iterations at the slowest K=4 block's step time."""
    if not hit_bp or not hit_lf:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "projection.json"
        import lfnnify
        from lfnnify.zoo import create_model

        cuts = lfnnify.plan(create_model("resnet18", num_classes=10), blocks=4,
                            example_input=torch.zeros(1, 3, 28, 28)).cuts
        cmd = [sys.executable, str(ROOT / "benchmarks" / "_speedup_worker.py"), "--method", "projection",
               "--model", "resnet18", "--size", "28", "--batch", "128", "--blocks", "4", "--cuts", *cuts,
               "--threads", str(args.cores), "--warmup", "2", "--out", str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.cores)})
        p = json.loads(out.read_text())
    key = "block_replay_step_s" if args.mode == "replay" else "block_lfnn_step_s"
    bp_step = sum(p["block_fwd_bwd_s"])
    slowest = max(p[key])
    bp_time = hit_bp["step"] * bp_step
    lf_time = hit_lf["step"] * slowest
    return {"bp_step_s": bp_step, "slowest_block_step_s": slowest, "bp_steps": hit_bp["step"],
            "pipeline_steps": hit_lf["step"], "ratio": bp_time / lf_time,
            "note": f"{hit_lf['step']} iterations at the slowest K=4 block's {slowest * 1e3:.0f} ms against backprop's "
                    f"{hit_bp['step']} at {bp_step * 1e3:.0f} ms, per-block times at {args.cores} threads, transfers "
                    f"not counted; iterations from this K={args.blocks} run (K=4 delays are longer)"}


if __name__ == "__main__":
    main()
