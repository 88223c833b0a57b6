"""Time to accuracy on Fashion-MNIST: backprop (one process, all cores) against the LFNN-ℓ pipeline (K=2 processes).

Both runs use `lfnnify train` on the same recipe (timm resnet18, in_chans=1; same data order, optimizer,
schedule and iterations); the pipeline run is started with torchrun, one thread per process. Test accuracy
is measured every --eval-every iterations; the training time (evaluations excluded) at which each run
first reaches the target accuracy is compared. Speed that costs accuracy is not speed.

Reproduce:  python benchmarks/time_to_accuracy.py --out benchmarks/results
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
            f"convert.blocks={args.blocks}", f"train.threads={1 if pipeline else args.cores}"]
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
                        help="accuracy to reach (default: the best accuracy both runs reach)")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    env_before = environment()
    with tempfile.TemporaryDirectory() as tmp:
        bp = run("backprop, 1 process", args, Path(tmp) / "bp", pipeline=False)
        lf = run(f"LFNN-ℓ pipeline, {args.blocks} processes", args, Path(tmp) / "lfnn", pipeline=True)
    target = args.target if args.target is not None else min(max(r["accuracy"] for r in bp),
                                                             max(r["accuracy"] for r in lf))
    hit_bp, hit_lf = first_reaching(bp, target), first_reaching(lf, target)
    ratio = hit_bp["train_seconds"] / hit_lf["train_seconds"] if hit_bp and hit_lf else None
    payload = {
        "experiment": "time_to_accuracy_fashion_mnist",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_accuracy": target,
        "bp": {"evaluations": bp, "reached": hit_bp},
        "lfnn_pipeline": {"evaluations": lf, "reached": hit_lf},
        "speedup_time_to_target": ratio,
        "final_accuracy": {"bp": bp[-1]["accuracy"], "lfnn_pipeline": lf[-1]["accuracy"]},
        "env_before": env_before,
        "env": environment(),
        "command": " ".join(["python", "benchmarks/time_to_accuracy.py", *sys.argv[1:]]),
    }
    stem = f"time_to_accuracy-fashion_mnist-resnet18-k{args.blocks}-{hardware_tag()}-{env_before['date'][:10]}"
    path = write_json(args.out / f"{stem}.json", payload)
    print(f"\ntarget test accuracy {target:.4f}: backprop reaches it after "
          f"{hit_bp['train_seconds']:.0f} s, the LFNN-ℓ pipeline after {hit_lf['train_seconds']:.0f} s"
          + (f" ({ratio:.2f}x)" if ratio else "") + f"\nwrote {path}")


if __name__ == "__main__":
    main()
