"""Exact-gradient backprop on a recipe's data, in plain PyTorch: the baselines of the two-host time to accuracy
(``benchmarks.time_to_accuracy --hosts 2``), started by torchrun on every host (not a benchmark of its own).

It trains what ``lfnnify train <recipe> --set method=bp`` trains: the same model from the same seed, the same
batches in the same order (every rank reads each batch of ``data.batch_size``), the recipe's SGD and cosine schedule,
one step per batch, in one of two ways a user with two machines picks:

- data parallel (the default): torch's DistributedDataParallel, each rank taking its slice of every batch, with the
  communication hook of ``--hook`` (``benchmarks.workers.speedup.register_hook``);
- ``--schedule``: the model split into stages (``--stage-cuts``) run by a ``torch.distributed.pipelining`` schedule
  over ``--microbatches`` micro-batches of every batch (GPipe, 1F1B, or two stages per rank for the interleaved and V
  schedules). The schedule scales the gradients by the micro-batch count, so a step applies the whole batch's mean
  gradient, as backprop on one device does (BatchNorm sees a micro-batch at a time).

Test accuracy every ``--eval-every`` steps on rank 0; the training time excludes evaluations, as ``lfnnify train``'s
``train_seconds`` does. Writes ``log.jsonl`` records of the same shape (``kind: eval``, ``step``, ``train_seconds``,
``accuracy``); ``--save`` writes the final weights of the whole model (safetensors) on rank 0.
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

import lfnnify
from lfnnify.app import create_model, load_recipe
from lfnnify.data import build_datasets, make_loader

from .speedup import SCHEDULES, add_hook_arguments, bucket_settings, register_hook, schedule_class, stages_of


@torch.no_grad()
def accuracy(forward, loader) -> float:
    right = total = 0
    for x, y in loader:
        right += (forward(x).argmax(1) == y).sum().item()
        total += len(y)
    return right / total


class DataParallel:
    """DDP with ``--hook``: one step on this rank's slice of each global batch."""

    def __init__(self, model, args):
        from torch.nn.parallel import DistributedDataParallel

        self.model, self.rank, self.world = model, dist.get_rank(), dist.get_world_size()
        self.ddp = DistributedDataParallel(model, **bucket_settings(model, args))  # rank 0's weights reach every rank
        self.averager = register_hook(self.ddp, args)
        self.params = list(self.ddp.parameters())

    def step(self, x, y, opt) -> None:
        share = -(-len(y) // self.world)  # this rank's slice of the global batch
        x, y = x[self.rank * share:(self.rank + 1) * share], y[self.rank * share:(self.rank + 1) * share]
        loss = F.cross_entropy(self.ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        opt.step()
        if self.averager is not None:  # local SGD: the replicas' parameters averaged every --local-sgd-every steps
            self.averager.average_parameters(self.ddp.parameters())

    def whole_model(self):
        """The model rank 0 evaluates and saves (every replica holds all of it; local SGD's may differ: rank 0's),
        and its state dict."""
        return self.model, self.model.state_dict()


class Pipelined:
    """A ``torch.distributed.pipelining`` schedule over the model cut at ``--stage-cuts``: this rank holds its
    stage(s) and runs its part of every step."""

    def __init__(self, model, args, example):
        from torch.distributed.pipelining import PipelineStage

        rank, world = dist.get_rank(), dist.get_world_size()
        self.mine = stages_of(args.schedule, rank, world)
        count = world * (1 if len(self.mine) == 1 else 2)
        if len(args.stage_cuts) != count - 1:
            raise SystemExit(f"--schedule {args.schedule} on {world} processes runs {count} stages: --stage-cuts names "
                             f"{len(args.stage_cuts)} cut(s), give {count - 1}")
        # every rank splits the same model (built from the same seed); only its own stages train here
        self.net = lfnnify.convert(model, cuts=args.stage_cuts, example_input=example)
        stages = [PipelineStage(self.net.blocks[k], k, count, torch.device("cpu")) for k in self.mine]
        loss = lambda out, target: F.cross_entropy(out, target)  # noqa: E731 - the mean over a micro-batch
        kind = schedule_class(args.schedule)
        self.schedule = kind(stages[0] if len(stages) == 1 else stages, n_microbatches=args.microbatches, loss_fn=loss)
        self.first, self.last = 0 in self.mine, count - 1 in self.mine
        self.params = [p for k in self.mine for p in self.net.blocks[k].parameters()]

    def step(self, x, y, opt) -> None:
        if self.first and self.last:
            self.schedule.step(x, target=y)
        elif self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y)
        else:
            self.schedule.step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def whole_model(self):
        """Every rank's stages gathered on rank 0 (a collective: every rank calls it): the whole trained model there,
        (None, None) elsewhere. Parameters and BatchNorm statistics, as a state dict per stage; the whole model's
        state dict has the original model's names (a block keeps its modules' names)."""
        mine = {k: {n: t.detach().clone() for n, t in self.net.blocks[k].state_dict().items()} for k in self.mine}
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if dist.get_rank() != 0:
            return None, None
        for states in gathered:
            for k, state in states.items():
                self.net.blocks[k].load_state_dict(state)
        whole = {n: t for block in self.net.blocks for n, t in block.state_dict().items()}
        return torch.nn.Sequential(*self.net.blocks), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", action="append", default=[], help="recipe overrides, as lfnnify train takes them")
    parser.add_argument("--eval-every", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save", type=Path, default=None, help="write the final weights here (safetensors, rank 0)")
    add_hook_arguments(parser)  # what DDP's users turn on for a slow link; plain DDP by default
    parser.add_argument("--schedule", default=None, choices=SCHEDULES,
                        help="split the model into stages run by this torch.distributed.pipelining schedule instead "
                             "of DDP")
    parser.add_argument("--microbatches", type=int, default=2, help="--schedule: micro-batches per batch")
    parser.add_argument("--stage-cuts", default=None, type=json.loads,
                        help='--schedule: the cuts between stages, a JSON list of node names, e.g. \'["layer3"]\'')
    args = parser.parse_args()
    if args.schedule and (args.hook != "none" or not args.stage_cuts):
        raise SystemExit("--schedule trains a split model with exact gradients: give --stage-cuts, and no --hook")
    recipe = load_recipe(args.recipe, overrides=args.set)
    t, o = recipe.train, recipe.train.optimizer
    torch.set_num_threads(t.threads or 1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(t.seed)  # as lfnnify train: the seed, then the data, then the model
    train_set, test_set, chans, classes, size = build_datasets(recipe)
    model = create_model(recipe.model.name, num_classes=recipe.model.num_classes or classes,
                         in_chans=recipe.model.in_chans or (chans if chans != 3 else None), cifar=recipe.model.cifar)
    if args.schedule:
        method = Pipelined(model, args, torch.zeros(1, chans, size, size))
        what = f"{args.schedule} over {world} processes, {args.microbatches} micro-batches"
    else:
        method = DataParallel(model, args)
        what = f"DDP over {world} processes ({recipe.data.batch_size // world} images each)"
    loader = make_loader(train_set, batch_size=recipe.data.batch_size, seed=t.seed, workers=recipe.data.workers)
    test = make_loader(test_set, batch_size=recipe.data.eval_batch_size, shuffle=False, workers=recipe.data.workers)
    total = t.iterations if t.iterations is not None else int(t.epochs * len(loader))
    opt = torch.optim.SGD(method.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                          nesterov=o.nesterov)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=t.schedule.final_lr)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{what}: {total} steps of {recipe.data.batch_size} images", flush=True)
    step, trained_s, batches, epoch, state = 0, 0.0, iter(()), 0, None
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
            method.step(x, y, opt)
            sched.step()
            step += 1
        trained_s += time.perf_counter() - chunk
        whole, state = method.whole_model()  # untimed; a split model: a collective gathering the stages on rank 0
        if rank == 0:
            whole.eval()
            record = {"kind": "eval", "step": step, "epoch": step / len(loader), "train_seconds": trained_s,
                      "accuracy": accuracy(whole, test)}
            whole.train()
            with open(args.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {step}: test accuracy {record['accuracy']:.4f}", flush=True)
        dist.barrier()  # the other ranks wait out the evaluation, untimed
    if rank == 0 and args.save:
        from safetensors.torch import save_file

        save_file({n: t.detach().contiguous() for n, t in state.items()}, str(args.save))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
