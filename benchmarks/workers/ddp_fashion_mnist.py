"""Data-parallel backprop on a recipe's data with torch's DistributedDataParallel: the baseline of
benchmarks.multihost_tta, started by torchrun on every host (not a benchmark of its own).

It trains what ``lfnnify train <recipe> --set method=bp`` trains, in plain PyTorch: the same model from the same seed,
the same batches in the same order (every rank reads each batch of ``data.batch_size`` and takes its own slice, so
the global batch is the recipe's), the recipe's SGD and cosine schedule, one step per batch. Test accuracy every
``--eval-every`` steps on rank 0; the training time excludes evaluations, as ``lfnnify train``'s ``train_seconds``
does. Writes ``log.jsonl`` records of the same shape (``kind: eval``, ``step``, ``train_seconds``, ``accuracy``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lfnnify.app import (
    create_model,  # noqa: E402
    load_recipe,  # noqa: E402
)
from lfnnify.data import build_datasets, make_loader  # noqa: E402

from .speedup import add_hook_arguments, bucket_settings, register_hook  # noqa: E402


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", action="append", default=[], help="recipe overrides, as lfnnify train takes them")
    parser.add_argument("--eval-every", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    add_hook_arguments(parser)  # what DDP's users turn on for a slow link; plain DDP by default
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, overrides=args.set)
    t, o = recipe.train, recipe.train.optimizer
    torch.set_num_threads(t.threads or 1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(t.seed)  # as lfnnify train: the seed, then the data, then the model
    train_set, test_set, chans, classes, _ = build_datasets(recipe)
    model = create_model(recipe.model.name, num_classes=recipe.model.num_classes or classes,
                         in_chans=recipe.model.in_chans or (chans if chans != 3 else None), cifar=recipe.model.cifar)
    ddp = DistributedDataParallel(model, **bucket_settings(model, args))  # rank 0's weights reach every rank here
    averager = register_hook(ddp, args)
    loader = make_loader(train_set, batch_size=recipe.data.batch_size, seed=t.seed, workers=recipe.data.workers)
    test = make_loader(test_set, batch_size=recipe.data.eval_batch_size, shuffle=False, workers=recipe.data.workers)
    total = t.iterations if t.iterations is not None else int(t.epochs * len(loader))
    opt = torch.optim.SGD(ddp.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                          nesterov=o.nesterov)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=t.schedule.final_lr)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"DDP over {world} processes: {total} steps of {recipe.data.batch_size} images "
              f"({recipe.data.batch_size // world} per process)", flush=True)
    step, trained_s, batches = 0, 0.0, iter(())
    epoch = 0
    while step < total:
        chunk = time.perf_counter()
        stop_at = min(total, (step // args.eval_every + 1) * args.eval_every)
        while step < stop_at:
            try:
                x, y = next(batches)
            except StopIteration:
                loader.sampler.set_epoch(epoch)
                epoch += 1
                batches = iter(loader)
                x, y = next(batches)
            share = -(-len(y) // world)  # this rank's slice of the global batch
            x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if averager is not None:  # local SGD: the replicas' parameters averaged every --local-sgd-every steps
                averager.average_parameters(ddp.parameters())
            sched.step()
            step += 1
        trained_s += time.perf_counter() - chunk
        if rank == 0:
            record = {"kind": "eval", "step": step, "epoch": step / len(loader), "train_seconds": trained_s,
                      "accuracy": evaluate(model, test), "train_loss": loss.item()}
            with open(args.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {step}: test accuracy {record['accuracy']:.4f}", flush=True)
        dist.barrier()  # the other ranks wait out the evaluation, untimed
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
