"""Run by torchrun from tests/test_replicas_powersgd.py: two replicas average made-up gradients through
lfnnify.pipeline.replicas.PowerSGDAverage for a few steps and save what each applied (not a test module)."""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfnnify.pipeline.replicas import PowerSGDAverage  # noqa: E402

# a conv weight, a linear weight, a bias: what a block's gradients look like; PowerSGD compresses the matrices
SHAPES = [(8, 4, 3, 3), (16, 12), (16,)]
STEPS, START, RANK = 6, 2, 1


def grads(rank: int, step: int, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(shape, generator=g) for shape in shapes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])  # a replica group, as the pipeline makes one per block
    average = PowerSGDAverage(group, rank=RANK, start=START, comm_device=torch.device("cpu"))
    record = {"given": [], "applied": [], "all_reduced": []}
    counted = [0]
    all_reduce = dist.all_reduce

    def counting(tensor, *a, **kw):  # the elements each step all-reduces on the replica group (torch's hook inside)
        if kw.get("group") is group:
            counted[0] += tensor.numel()
        return all_reduce(tensor, *a, **kw)

    dist.all_reduce = counting
    for step in range(STEPS):
        given = grads(rank, step)
        applied = [t.clone() for t in given]
        counted[0] = 0
        average(applied)
        record["all_reduced"].append(counted[0])
        record["given"].append(given)
        record["applied"].append(applied)
    dist.all_reduce = all_reduce
    record["error"] = average.state.error_dict[0].clone()
    other = [t.clone() for t in grads(rank, STEPS, SHAPES[1:])]  # another layout: its own bucket and memories
    average(other)
    record["other_layout"] = other
    record["buckets"] = sorted(average.state.error_dict)
    torch.save(record, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
