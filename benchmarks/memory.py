"""Peak training memory and seconds per step: backprop, backprop with activation checkpointing, and the one-device
LFNN-ℓ trainer (block after block, K=4).

- ``bp``: plain backprop.
- ``bp_checkpointed``: backprop with activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``)
  at the cuts ``plan()`` chooses for the same K and balance: each block but the last keeps only its input and is
  recomputed in the backward. Its gradients are backprop's exactly, so it learns what backprop learns; only memory
  and time differ. It is what a memory-bound user of backprop turns on.
- ``lfnn``: the one-device LFNN-ℓ trainer on the same cuts.

CPU: peak resident set size (VmHWM) of a fresh process per method, after a few training steps.
GPU: torch.cuda.max_memory_allocated. Seconds per step: the median of the steps after the first.
Anchor: InfoPro's K=4 ResNet-110 result, -62.6% against BP.

Reproduce:  python -m benchmarks.memory --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, environment, hardware_tag, write_json  # noqa: E402

METHODS = ("bp", "bp_checkpointed", "lfnn")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpointed_forward(blocks, x):
    """The model's forward through ``blocks``, every block but the last under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    h = x
    for block in blocks[:-1]:
        h = checkpoint(block, h, use_reentrant=False)
    return blocks[-1](h)


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    import lfnnify
    from lfnnify.app import create_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(args.model, num_classes=args.classes)  # on the CPU: converted there, then moved
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    opt_factory = lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)  # noqa: E731
    if args.method == "bp":
        model.to(device)
        opt = opt_factory(model.parameters())
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    elif args.method == "bp_checkpointed":
        net = lfnnify.convert(model, blocks=args.blocks, balance=args.balance, example_input=x[:1].cpu(),
                              share_parameters=True).to(device)  # only for its blocks: the plan's cuts
        del model
        blocks = list(net.blocks)
        opt = opt_factory([p for b in blocks for p in b.parameters()])
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(checkpointed_forward(blocks, x), y).backward()
            opt.step()
    else:
        # share_parameters: train the model's own weights, no second copy (how a memory-bound user converts)
        net = lfnnify.convert(model, blocks=args.blocks, balance=args.balance, example_input=x[:1].cpu(),
                              share_parameters=True).to(device)
        del model
        trainer = lfnnify.Trainer(net, optimizer=opt_factory, progress=False)
        def step():
            trainer.train_step(x, y)
    rss_before = _peak_rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"method": args.method, "peak_rss_bytes": _peak_rss_bytes(), "rss_before_training_bytes": rss_before,
              "step_s": times, "device": str(device)}
    if device.type == "cuda":
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet101")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="training steps per method (the first is untimed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--balance", default="memory", choices=["flops", "memory", "time", "params"],
                        help="how the K blocks are chosen (memory: equal activation bytes)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in both workers, so that freed activations go "
                             "back to the OS and peak RSS counts live memory, not allocator caching")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", dest="method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(worker(args)))
        return

    env_before = environment(args.threads)
    results = {}
    for method in METHODS:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", method, *sys.argv[1:]]
        load = os.getloadavg()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
        results[method] = {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load,
                           "load_after": os.getloadavg()}
        times = results[method]["step_s"][1:] or results[method]["step_s"]
        results[method]["step_s_median"] = statistics.median(times)
        results[method]["step_s_range"] = [min(times), max(times)]
        print(f"  {method}: peak RSS {results[method]['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"{results[method]['step_s_median']:.2f} s per step ({min(times):.2f}-{max(times):.2f})", flush=True)
    key = "cuda_max_memory_allocated_bytes" if "cuda_max_memory_allocated_bytes" in results["bp"] else "peak_rss_bytes"
    ratio = results["lfnn"][key] / results["bp"][key]
    checkpointed = results["bp_checkpointed"][key] / results["bp"][key]
    payload = {
        "experiment": "memory",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "method"},
        "methods": results,
        "metric": key,
        "peak_bytes": {m: r[key] for m, r in results.items()},
        "lfnn_over_bp": ratio,
        "bp_checkpointed_over_bp": checkpointed,
        "lfnn_over_bp_checkpointed": results["lfnn"][key] / results["bp_checkpointed"][key],
        "step_s_median": {m: r["step_s_median"] for m, r in results.items()},
        "lfnn_step_over_bp_checkpointed_step": results["lfnn"]["step_s_median"] /
                                               results["bp_checkpointed"]["step_s_median"],
        "reduction_percent": 100 * (1 - ratio),
        "target_lfnn_over_bp_at_most": 0.45,
        "meets_target": ratio <= 0.45,
        "anchor": "InfoPro (ICLR 2021), ResNet-110, batch 1024, K=4, one GPU: 3.52 GB vs 9.40 GB for BP (-62.6%)",
        "note": "peak RSS includes the Python interpreter, torch itself, weights, gradients and optimizer state, "
                "which both methods pay; only activations differ",
        "env_before": env_before,
        "env": environment(args.threads),
        "command": " ".join(["python -m benchmarks.memory", *sys.argv[1:]]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", payload)
    if args.out.resolve() == RESULTS.resolve():
        alloc = "-mmap" if args.mmap_threshold is not None else ""
        stem = f"memory-{args.model}-k{args.blocks}-b{args.batch}-{args.balance}{alloc}-{hardware_tag()}"
        write_json(args.out / f"{stem}-{env_before['date'][:10]}.json", payload)
    print(f"{args.model} {args.size}px batch {args.batch}: LFNN-ℓ (K={args.blocks}, one device, "
          f"balance={args.balance}) peak {key} = "
          f"{ratio:.1%} of BP's ({100 * (1 - ratio):.1f}% less; target <= 45%); checkpointed BP at the same cuts "
          f"{checkpointed:.1%} of BP's; LFNN-ℓ's step {payload['lfnn_step_over_bp_checkpointed_step']:.2f}x "
          f"checkpointed BP's")


if __name__ == "__main__":
    main()
