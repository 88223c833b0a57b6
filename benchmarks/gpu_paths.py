"""lfnnify's GPU code paths, each checked for real and reported as soon as it ends (benchmarks/gpu_check.sh).

Each check appends one JSON line to ``--out`` (``{"check", "ok", "seconds", ...}``) the moment it ends, so a
run cut short keeps what it checked:

1. ``trainer``: the one-device trainer on the GPU (replay, weight stashing and prediction; 5 steps of timm
   resnet18 at 32 px) ends near the same run on the CPU (TF32 and kernel choice differ, so near, not equal);
2. ``nonfinite``: a NaN input on the GPU stops training with the error that names the block, within
   ``FINITE_CHECK_EVERY`` steps (the loss is checked on the device);
3. ``cli``: ``lfnnify train`` on synthetic data puts the model on the GPU by itself and says so;
4. ``pipeline``: two pipeline processes on this machine (they share one GPU, so gloo: the line saying so must
   appear) equal the one-device trainer, local and replay (tests/pipeline_worker.py's scenarios).

On a machine without a GPU every check runs on the CPU (the dry run the tests keep working).
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

ROOT = Path(__file__).resolve().parents[1]

import lfnnify  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _report(out: Path, check: str, started: float, ok: bool, **facts) -> None:
    line = {"check": check, "ok": ok, "seconds": round(time.perf_counter() - started, 2), "device": str(DEVICE),
            **facts}
    with out.open("a") as f:
        f.write(json.dumps(line, default=str) + "\n")
    print(("ok  " if ok else "FAIL") + f" {check}: {json.dumps(facts, default=str)[:300]}", flush=True)


def _net(device):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    net = lfnnify.convert(model, blocks=3, mode="replay", weight_stashing=True, weight_prediction=True,
                          example_input=torch.zeros(1, 3, 32, 32))
    return net.to(device)


def check_trainer(out: Path) -> None:
    started = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(5)]
    weights = {}
    for device in {torch.device("cpu"), DEVICE}:
        net = _net(device)
        trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                                  progress=False)
        for x, y in batches:
            trainer.train_step(x, y)
        weights[device.type] = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    cpu, dev = weights["cpu"], weights[DEVICE.type]
    worst = max(((cpu[k] - dev[k]).abs().max() / (cpu[k].abs().max() + 1e-6)).item() for k in cpu
                if cpu[k].is_floating_point())
    _report(out, "trainer", started, worst < 5e-2, largest_relative_difference=worst)


def check_nonfinite(out: Path) -> None:
    started = time.perf_counter()
    net = _net(DEVICE)
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05), progress=False)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    message, at = None, None
    for step in range(60):
        try:
            trainer.train_step(x if step != 3 else torch.full_like(x, float("nan")), y)
        except lfnnify.NonFiniteLossError as exc:
            message, at = str(exc), step
            break
    every = 25 if DEVICE.type == "cuda" else 1
    ok = message is not None and "at step 3" in message and at < 3 + every
    _report(out, "nonfinite", started, ok, message=message, raised_at_step=at)


def check_cli(out: Path) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lfnnify", "train", str(ROOT / "recipes" / "fashion_mnist_resnet18_k4.yaml"),
               "--out", f"{tmp}/run", "--set", "data.dataset=synthetic", "--set", "data.input_size=32",
               "--set", "model.in_chans=3", "--set", "train.iterations=4", "--set", "data.train_subset=256",
               "--set", "data.eval_subset=64", "--set", "train.threads=2", "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    said = f"on device {DEVICE.type}" in proc.stdout
    _report(out, "cli", started, proc.returncode == 0 and said, exit=proc.returncode, device_named=said,
            tail=(proc.stdout + proc.stderr)[-600:] if proc.returncode or not said else "")


def check_pipeline(out: Path) -> None:
    started = time.perf_counter()
    from tests import pipeline_worker as worker
    from tests.launch import torchrun

    with tempfile.TemporaryDirectory() as tmp:
        proc, seconds = torchrun(2, "--scenarios", "2-local", "2-replay", "--out", tmp, timeout=300)
        facts = {"exit": proc.returncode, "launch_seconds": round(seconds, 1),
                 "gloo_note": "talk over gloo" in proc.stderr}
        if proc.returncode != 0:
            return _report(out, "pipeline", started, False, **facts, tail=proc.stderr[-1500:])
        worst = 0.0
        for name in ("2-local", "2-replay"):
            piped = lfnnify.load(Path(tmp) / name / "ckpt")
            net = worker.build(name).to(DEVICE)
            trainer = lfnnify.Trainer(net, **worker.trainer_knobs(name))
            trainer.fit(worker.loaders(name)[0], epochs=10, max_steps=worker.spec(name)["steps"])
            a, b = piped.state_dict(), net.state_dict()
            worst = max(worst, max(((a[k].float().cpu() - b[k].float().cpu()).abs().max()).item() for k in a))
    expected_note = DEVICE.type == "cuda" and torch.cuda.device_count() < 2
    _report(out, "pipeline", started, worst < 5e-2 and facts["gloo_note"] == expected_note,
            largest_difference=worst, **facts)
    return None


CHECKS = {"trainer": check_trainer, "nonfinite": check_nonfinite, "cli": check_cli, "pipeline": check_pipeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="a JSONL file; one line per check as it ends")
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "2")))  # 2 unless the caller says
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.checks:
        started = time.perf_counter()
        try:
            CHECKS[name](args.out)
        except Exception as exc:  # noqa: BLE001 - one check's failure is a result; the next one still runs
            _report(args.out, name, started, False, error=f"{type(exc).__name__}: {exc}"[:1500])
        failed += not json.loads(args.out.read_text().splitlines()[-1])["ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
