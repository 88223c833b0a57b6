"""How long lfnnify.convert takes for timm resnet101, K=4 (target: under 2 s on 2 cores).

Reproduce:  python -m benchmarks.convert_time --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .common import RESULTS, environment, hardware_tag, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet101")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import timm

    import lfnnify

    torch.set_num_threads(args.threads)
    env_before = environment(args.threads)
    model = timm.create_model(args.model)
    lfnnify.convert(model, blocks=args.blocks)  # warm-up: imports, allocator
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        net = lfnnify.convert(model, blocks=args.blocks)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    payload = {
        "experiment": "convert_time",
        "model": args.model,
        "blocks": args.blocks,
        "input": list(net.plan.input_shape),
        "convert_s": times,
        "convert_s_median": median,
        "target_s": 2.0,
        "meets_target": median < 2.0,
        "imbalance": net.plan.imbalance,
        "cuts": net.plan.cuts,
        "env_before": env_before,
        "env": environment(args.threads),
        "command": "python -m benchmarks.convert_time --out benchmarks/results",
    }
    path = write_json(
        args.out / f"convert_time-{args.model}-k{args.blocks}-{hardware_tag()}-{env_before['date'][:10]}.json", payload
    )
    print(
        f"{args.model} K={args.blocks}: convert median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f}) "
        f"over {args.repeats} runs, {args.threads} threads; imbalance {net.plan.imbalance:.3f}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
