"""One rank of ``lfnnify demo``'s multi-process runs (started by torch.distributed.run; not a public module).

``--knobs`` (a JSON list): pipelines that train on Fashion-MNIST against the clock, one after another (the demo's
curves). ``--hosts-methods`` (``pipeline``, ``ddp``, ``ddp_powersgd``): a few steps each of a fixed synthetic batch
across the demo's two hosts, timing the steps and counting the bytes this host sends on its link
(``GLOO_SOCKET_IFNAME``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

HOSTS_WARMUP = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--knobs")
    parser.add_argument("--budget", type=float)
    parser.add_argument("--evals", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--hosts-methods", nargs="+", choices=["pipeline", "ddp", "ddp_powersgd"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=64, help="the global batch of the runs across hosts")
    args = parser.parse_args()
    if args.hosts_methods:
        return across_hosts(args)

    import lfnnify

    from ..data import make_loader
    from .demo import BATCH, datasets, demo_model, sgd, train_for

    torch.set_num_threads(1)

    def agree(go_on: bool) -> bool:
        flag = [go_on]
        dist.broadcast_object_list(flag, src=0)  # rank 0 keeps the clock
        return flag[0]

    results = []
    for knobs in json.loads(args.knobs):  # the methods one after another, each from a fresh model and trainer
        net = lfnnify.convert(demo_model(), example_input=torch.zeros(1, 1, 28, 28), **knobs)
        trainer = lfnnify.PipelineTrainer(net, optimizer=sgd, threads=1, progress=False, timeout_s=120)
        loader = test_loader = None
        if trainer.first:
            train, test, _ = datasets(args.quick)
            loader = make_loader(train, batch_size=BATCH, seed=0)
            test_loader = make_loader(test, batch_size=500, shuffle=False)
        results.append(train_for(trainer, loader, test_loader, budget=args.budget, evals=args.evals,
                                 clock=trainer.first, agree=agree))
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(results))
    dist.destroy_process_group()
    return None


def _sent() -> int:
    return int(Path(f"/sys/class/net/{os.environ['GLOO_SOCKET_IFNAME']}/statistics/tx_bytes").read_text())


def across_hosts(args) -> None:
    """Each method: ``args.steps`` steps after warm-up. The bytes every host sent are counted between two barriers
    (every message of those steps delivered); the rate is the last rank's between its timed steps (the steady rate,
    without the pipeline's fill and drain). The last rank writes the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {method: _across_hosts(method, args.steps, args.model, args.batch) for method in args.hosts_methods}
    if dist.get_rank() == dist.get_world_size() - 1:  # the last stage (or any DDP rank) finishes every step
        args.out.parent.mkdir(parents=True, exist_ok=True)  # on its own host's disk
        args.out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _powersgd(model):
    """DDP with PowerSGD as its documentation sets it up for a slow link: rank 1, error feedback and warm start,
    compressing from the first step after the warm-up (torch's default, step 1,000, would never compress here).
    One gradient bucket: the hook starts its P and Q all-reduces from callbacks, and with several buckets in flight
    gloo can pair collectives that two processes started in different orders."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    one_bucket = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1
    wrapped = DistributedDataParallel(model, bucket_cap_mb=one_bucket)
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                        start_powerSGD_iter=HOSTS_WARMUP, use_error_feedback=True, warm_start=True)
    wrapped.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return wrapped


def _across_hosts(method: str, steps: int, model_name: str, batch: int) -> dict:
    import lfnnify
    from lfnnify.app.zoo import create_model

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, cifar=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    stamps: list[float] = []  # the end of every step: the rate is the steady one, between timed steps
    if method in ("ddp", "ddp_powersgd"):
        from torch.nn.parallel import DistributedDataParallel

        share = batch // world
        xs, ys = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        if method == "ddp_powersgd":
            wrapped = _powersgd(model)
        else:
            wrapped = DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9)

        def train(n):
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(wrapped(xs), ys).backward()
                opt.step()
                stamps.append(time.perf_counter())
    else:
        net = lfnnify.convert(model, blocks=world, example_input=torch.zeros(1, 3, 32, 32))
        trainer = lfnnify.PipelineTrainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                                          threads=1, progress=False, timeout_s=120)
        batches = [(x, y)] * (HOSTS_WARMUP + steps)
        step = trainer._stage_step

        def timed(*batch):
            out = step(*batch)
            stamps.append(time.perf_counter())
            return out

        trainer._stage_step = timed

        def train(n):  # a fit ends with every message delivered, so the bytes counted below are all of them
            trainer.fit(batches if trainer.first else None, max_steps=trainer.step + n)

    train(HOSTS_WARMUP)
    dist.barrier()
    start, before = time.perf_counter(), _sent()
    train(steps)
    dist.barrier()
    seconds, mine = time.perf_counter() - start, _sent() - before
    rate = batch * (steps - 1) / (stamps[-1] - stamps[HOSTS_WARMUP])  # this rank's steady rate
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"seconds": seconds, "bytes": mine, "samples_per_s": rate})
    return {"samples_per_s": everyone[-1]["samples_per_s"], "batch": batch, "steps": steps,
            "bytes_per_step": sum(e["bytes"] for e in everyone) / steps, "per_host": everyone}


if __name__ == "__main__":
    main()
