"""Run by torchrun from benchmarks/replicas_traffic.py (4 processes: 2 blocks x 2 replicas): lfnnify's pipeline
trains a few steps while every collective on a block's replica group is counted, and each block's first replica
writes what its replicas exchanged per step (not a benchmark on its own: the launcher runs it).

The count is of the tensors handed to ``torch.distributed``'s all-reduce and broadcast on the replica group (what
``average_gradients``, torch's ``powerSGD_hook`` and ``broadcast_buffers`` send), in bytes, step by step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

import lfnnify
from lfnnify.app import create_model
from lfnnify.data import SyntheticImages, make_loader

COUNTED = ("all_reduce", "broadcast")


def _count_collectives(counts: dict[str, int], group_of) -> None:
    """Wrap torch.distributed's all-reduce and broadcast so that each adds its tensor's bytes to ``counts`` when it
    runs on the group ``group_of()`` returns (the callers look them up on the module at each call)."""
    for name in COUNTED:
        original = getattr(dist, name)

        def counted(tensor, *a, _original=original, _name=name, **kw):
            if kw.get("group") is not None and kw["group"] is group_of():
                counts[_name] += tensor.numel() * tensor.element_size()
            return _original(tensor, *a, **kw)

        setattr(dist, name, counted)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="each replica's batch")
    parser.add_argument("--cuts", nargs="+", required=True)
    parser.add_argument("--mode", default="replay", choices=["local", "replay"])
    parser.add_argument("--powersgd-rank", type=int, default=None)
    parser.add_argument("--powersgd-start", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, cifar=True)
    net = lfnnify.convert(model, cuts=args.cuts, example_input=torch.zeros(1, 3, args.size, args.size),
                          mode=args.mode, weight_stashing=args.mode == "replay")
    counts = {name: 0 for name in COUNTED}
    holder = {}
    _count_collectives(counts, lambda: holder.get("group"))
    trainer = lfnnify.PipelineTrainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
                                      threads=1, progress=False, timeout_s=600,
                                      replicas_powersgd_rank=args.powersgd_rank,
                                      replicas_powersgd_start=args.powersgd_start)
    holder["group"] = trainer.group  # counted from here: the first replica's broadcast of the start state is not
    per_step = []
    step = trainer._stage_step

    def counted_step(*batch):
        before = dict(counts)
        out = step(*batch)
        per_step.append({name: counts[name] - before[name] for name in COUNTED})
        return out

    trainer._stage_step = counted_step
    averaged: list = []  # the shapes of the gradients each step's average was given
    reduce = trainer.updates[trainer.stage].reduce

    def recorded_reduce(grads):
        averaged.append([list(g.shape) for g in grads])
        return reduce(grads)

    trainer.updates[trainer.stage].reduce = recorded_reduce
    data = SyntheticImages(args.batch * trainer.replicas * args.steps, shape=(3, args.size, args.size), seed=1)
    loader = make_loader(data, batch_size=args.batch, seed=2)
    trainer.fit(loader if trainer.first else None, epochs=1, max_steps=args.steps)
    mine = {"block": trainer.stage, "replica": trainer.replica, "per_step": per_step, "averaged_shapes": averaged}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps({"ranks": everyone}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
