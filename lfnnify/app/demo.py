"""``lfnnify demo``: backprop against lfnnify's pipelines at equal wall-clock time, memory, and two hosts.

Every method trains the same timm model on Fashion-MNIST for the same number of seconds (``--budget``), on the
same batches in the same order, and is evaluated on test images along the way, so the comparison is accuracy
after equal training time on this machine:

- backprop, one process on every core (the one-block conversion: exactly backprop, through the same trainer);
- lfnnify's pipelines with K=2 blocks, two processes started as torchrun starts them, one core each: the
  replay mode (delayed end-to-end gradients) and plain LFNN-ℓ beside it.

The model is timm's ``test_resnet`` (a small ResNet, 0.37M parameters): a 2-core CPU trains it to a visible
result in half a minute (timm resnet18 at 28 px learns little in that time on the slower CPU of our machine kind).

Then peak training memory of backprop against the one-device trainer for a larger model (resnet50), and, where
the machine allows it (root, iproute2), two hosts joined by a 1 Gbit/s link: the LFNN-ℓ pipeline against
data-parallel backprop, plain and with PowerSGD, side by side, with the bytes each really sent. Adding a method is
one line in ``METHODS``.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .demo_hosts import RATE, cross_host, verdict
from .machine import cpu_name, status_bytes

__all__ = ["run_demo", "METHODS"]

BATCH, EVAL_EXAMPLES, WARMUP_STEPS = 128, 2000, 3
BUDGET_S = 30.0  # training seconds per method: backprop reaches about 0.8 in it on the slower CPU (AMD EPYC, 2 cores)
MODEL = "test_resnet"  # timm's small ResNet; HOSTS_MODEL is the larger one whose gradients make DDP's traffic
HOSTS_MODEL, HOSTS_STEPS, HOSTS_BATCH = "resnet18", 5, 64  # --quick: 2 steps of batch 16


@dataclass(frozen=True)
class Method:
    """One curve of the demo: ``kind`` is "bp" (plain backprop), "pipeline" (torchrun, 2 processes) or
    "single" (the one-device trainer); ``knobs`` go to ``lfnnify.convert``."""

    name: str
    kind: str
    knobs: dict = field(default_factory=dict)  # "bp": the one-block conversion (no heads: exactly backprop)


REPLAY = dict(blocks=2, mode="replay", weight_stashing=True)  # the leaderboard's best pipeline-capable mode
METHODS = [
    Method("backprop", "bp", dict(blocks=1)),
    Method("replay pipeline, K=2", "pipeline", REPLAY),
    Method("LFNN-ℓ pipeline, K=2", "pipeline", dict(blocks=2)),  # the paper's mode
]


# ---------------------------------------------------------------- data and models


def datasets(quick: bool):
    """(train, test, description); synthetic data, with a note, when Fashion-MNIST is not installed."""
    from torch.utils.data import Subset

    from ..data import FashionMNIST, SyntheticImages
    from ..errors import DataNotFoundError

    try:
        train, test = FashionMNIST(train=True, augment=True), FashionMNIST(train=False)
        source = "Fashion-MNIST (real data)"
    except DataNotFoundError as exc:
        print(f"note: {exc}\n      using synthetic data instead, so the accuracies below mean little")
        train, test = SyntheticImages(8192), SyntheticImages(EVAL_EXAMPLES, seed=1)
        source = "synthetic data (Fashion-MNIST is not installed)"
    if quick:
        train, test = Subset(train, range(512)), Subset(test, range(256))
    else:
        test = Subset(test, range(min(EVAL_EXAMPLES, len(test))))
    return train, test, source


def demo_model(name: str = MODEL):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, in_chans=1, num_classes=10)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


# ---------------------------------------------------------------- training against the clock


def train_for(trainer, loader, test_loader, *, budget: float, evals: int, clock: bool = True, agree=None) -> dict:
    """Train ``trainer`` for ``budget`` seconds of training time, evaluating ``evals`` times along the way
    (evaluation time not counted). In a pipeline every rank calls it: the rank with ``clock`` (rank 0) keeps
    the time and stops the pipeline (the others follow its end-of-phase message); ``agree(go_on)`` returns
    rank 0's decision to every rank."""
    curve, trained, samples = [], 0.0, 0
    first = clock
    # the first steps of a process are several times slower (kernel selection, allocator); every method trains
    # the same WARMUP_STEPS before its clock starts, so none pays for them and none is spared them
    trainer.fit(loader if first else None, epochs=10**9, max_steps=WARMUP_STEPS)
    while True:
        chunk = min(budget / evals, budget - trained)
        timer = threading.Timer(chunk, trainer.request_stop) if first else None
        steps_before = trainer.step
        start = time.perf_counter()
        if timer:
            timer.start()
        trainer.fit(loader if first else None, epochs=10**9)
        if timer:
            timer.cancel()
        trained += time.perf_counter() - start
        trainer._stop = False
        samples += (trainer.step - steps_before) * BATCH
        metrics = trainer.evaluate(test_loader if first else None)
        curve.append({"seconds": trained, "accuracy": metrics["accuracy"], "step": trainer.step})
        go_on = trained < budget * 0.999
        if agree is not None:
            go_on = agree(go_on)
        if not go_on:
            return {"curve": curve, "samples_per_s": samples / max(trained, 1e-9), "steps": trainer.step}


def run_in_process(method: Method, args, train, test) -> dict:
    import lfnnify

    from ..data import make_loader

    torch.set_num_threads(os.cpu_count() or 1)
    loader, test_loader = make_loader(train, batch_size=BATCH, seed=0), make_loader(test, batch_size=500, shuffle=False)
    net = lfnnify.convert(demo_model(), example_input=torch.zeros(1, 1, 28, 28), **method.knobs)
    trainer = lfnnify.Trainer(net, optimizer=sgd, progress=False)
    return train_for(trainer, loader, test_loader, budget=args.budget, evals=args.evals)


def run_pipelines(methods: list[Method], args) -> dict:
    """Every pipeline method in one launch of two processes (started as torchrun starts them, one core each), one
    after another: a launch costs more here than a method's warm-up. Returns each method's result by name."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "--max-restarts", "0", "-m", "lfnnify.app.demo_stage",
               "--knobs", json.dumps([m.knobs for m in methods]), "--budget", str(args.budget), "--evals",
               str(args.evals), "--out", str(out)] + (["--quick"] if args.quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=(args.budget * 4 + 150) * len(methods))
        if proc.returncode != 0:
            raise RuntimeError(f"the pipeline runs failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return dict(zip((m.name for m in methods), json.loads(out.read_text())))


# ---------------------------------------------------------------- memory


def _fresh_peak() -> int:
    """Release freed memory to the system and restart the peak-RSS counter; returns the resident size now."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    return status_bytes("VmRSS")


def memory(quick: bool) -> dict | None:
    """Peak memory one training step adds, backprop against the one-device trainer (K=4, memory-balanced),
    for timm resnet50 at 96 px, batch 32 (reset and read with /proc; Linux only)."""
    import timm

    import lfnnify

    if not Path("/proc/self/clear_refs").exists():
        return None
    size, batch = (64, 8) if quick else (96, 32)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    torch.set_num_threads(2)
    peaks = {}
    for name in ("lfnnify, one device (K=4)", "backprop"):
        torch.manual_seed(0)
        model = timm.create_model("resnet50")
        if name == "backprop":
            opt = sgd(model.parameters())
            base = _fresh_peak()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            net = lfnnify.convert(model, blocks=4, balance="memory", share_parameters=True,
                                  example_input=torch.zeros(1, 3, size, size))
            trainer = lfnnify.Trainer(net, optimizer=sgd, progress=False)
            base = _fresh_peak()
            trainer.train_step(x, y)
        peaks[name] = status_bytes("VmHWM") - base
        del model
    return {"model": f"timm resnet50, {size}px, batch {batch}", "peak_bytes": peaks}


# ---------------------------------------------------------------- the demo


def _report(name: str, r: dict, seconds: float) -> None:
    print(f"   {name:<24} test accuracy {r['curve'][-1]['accuracy']:.4f} after {r['steps']:>4} steps "
          f"({WARMUP_STEPS} untimed) in {r['curve'][-1]['seconds']:.1f} s, {r['samples_per_s']:6.0f} samples/s   "
          f"[{seconds:.1f} s]", flush=True)


def run_demo(*, quick: bool = False, out: str | None = None, budget: float | None = None) -> int:
    import lfnnify

    from ..plots import plot_demo

    class Args:
        pass

    args = Args()
    args.quick, args.budget = quick, budget if budget is not None else (3.0 if quick else BUDGET_S)
    args.evals = 2 if quick else 5
    out_dir = Path(out) if out else Path("runs") / f"demo-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    machine = f"{os.cpu_count()} cores, {cpu_name()}"

    print(f"1. convert timm {MODEL} (1 input channel, 10 classes) into 2 blocks, and check it")
    t = time.perf_counter()
    model = demo_model()
    net = lfnnify.convert(model, example_input=torch.zeros(1, 1, 28, 28), **REPLAY)
    x = torch.randn(16, 1, 28, 28)
    model.eval(), net.eval()
    with torch.no_grad():
        same = torch.equal(net(x), model(x))
    print(net.plan)
    print(f"   the converted model computes what the original computes (eval mode, bit for bit): {same}"
          f"   [{time.perf_counter() - t:.1f} s]\n")
    if not same:
        return 1

    train, test, source = datasets(quick)
    print(f"2. train each method for {args.budget:g} s of training time on {source}, batch {BATCH}, "
          f"test accuracy on {len(test)} test images along the way ({machine})")
    results = {}
    for method in METHODS:
        if method.kind == "pipeline":
            continue
        t = time.perf_counter()
        results[method.name] = run_in_process(method, args, train, test)
        _report(method.name, results[method.name], time.perf_counter() - t)
    t = time.perf_counter()
    piped = run_pipelines([m for m in METHODS if m.kind == "pipeline"], args)
    for name, r in piped.items():
        results[name] = r
        _report(name, r, (time.perf_counter() - t) / len(piped))

    t = time.perf_counter()
    mem = memory(quick)
    if mem:
        (lf, lf_peak), (bp, bp_peak) = mem["peak_bytes"].items()
        print(f"\n3. peak memory of one training step, {mem['model']}: backprop {bp_peak / 2**30:.2f} GiB, "
              f"{lf} {lf_peak / 2**30:.2f} GiB   [{time.perf_counter() - t:.1f} s]")

    t = time.perf_counter()
    hosts = cross_host(steps=2 if quick else HOSTS_STEPS, batch=16 if quick else HOSTS_BATCH, model=HOSTS_MODEL)
    if isinstance(hosts, str):
        print(f"\n4. two hosts joined by a {RATE} link: skipped ({hosts})")
    else:
        print(f"\n4. two hosts on this machine (network namespaces, one core each) joined by a {RATE} link, timm "
              f"{HOSTS_MODEL} (32 px, batch {next(iter(hosts.values()))['batch']}, K=2): a few steps each")
        for name, r in hosts.items():
            print(f"   {name:<29} {r['samples_per_s']:6.1f} samples/s, {r['bytes_per_step'] / 1e6:6.2f} MB sent per "
                  f"step on the link (measured)")
        print(f"   [{time.perf_counter() - t:.1f} s]")

    bp = results["backprop"]
    plot = plot_demo({n: r["curve"] for n, r in results.items()}, mem, out_dir / "demo.png",
                     title=f"timm {MODEL}, {source.split(' (')[0]}, {args.budget:g} s each ({machine})",
                     hosts=None if isinstance(hosts, str) else hosts,
                     hosts_title=f"two hosts, one core each, {RATE} link, timm {HOSTS_MODEL}")
    (out_dir / "demo.json").write_text(json.dumps({
        "results": results, "memory": mem, "hosts": hosts, "machine": machine, "model": MODEL,
        "budget_s": args.budget, "source": source, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "torch": torch.__version__}, indent=1))
    best = next(m.name for m in METHODS if m.kind == "pipeline")  # the headline: the first pipeline method
    print(f"\npicture: {plot}")
    print(f"\nsummary ({machine}; every ratio is to backprop's, measured side by side in this run):")
    ours, theirs = results[best]["curve"][-1]["accuracy"], bp["curve"][-1]["accuracy"]
    print(f"- accuracy after {args.budget:g} s of training each: {best} {ours:.4f} against backprop's {theirs:.4f} "
          f"({ours / theirs:.2f}x)")
    print("- throughput on this machine: " + ", ".join(f"{n} {r['samples_per_s'] / bp['samples_per_s']:.2f}x"
                                                        for n, r in results.items() if n != "backprop"))
    if mem:
        print(f"- memory: the one-device trainer peaks at {lf_peak / bp_peak:.2f}x backprop's ({mem['model']}); "
              f"pipelines split it further, one block per device")
    if not isinstance(hosts, str):
        print(f"- {verdict(hosts)}")
    print(f"\ndemo time {time.perf_counter() - started:.0f} s (set-up excluded); everything is in {out_dir}/")
    return 0
