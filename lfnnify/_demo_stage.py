"""One rank of ``lfnnify demo``'s pipeline runs (started by torch.distributed.run; not a public module)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--knobs", required=True)
    parser.add_argument("--budget", type=float, required=True)
    parser.add_argument("--evals", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    import lfnnify

    from .data import make_loader
    from .demo import BATCH, datasets, resnet18, sgd, train_for

    torch.set_num_threads(1)
    net = lfnnify.convert(resnet18(), example_input=torch.zeros(1, 1, 28, 28), **json.loads(args.knobs))
    trainer = lfnnify.PipelineTrainer(net, optimizer=sgd, threads=1, progress=False, timeout_s=120)
    loader = test_loader = None
    if trainer.first:
        train, test, _ = datasets(args.quick)
        loader = make_loader(train, batch_size=BATCH, seed=0)
        test_loader = make_loader(test, batch_size=500, shuffle=False)
    def agree(go_on: bool) -> bool:
        flag = [go_on]
        dist.broadcast_object_list(flag, src=0)  # rank 0 keeps the clock
        return flag[0]

    result = train_for(trainer, loader, test_loader, budget=args.budget, evals=args.evals, clock=trainer.first,
                       agree=agree)
    if trainer.rank == 0:
        args.out.write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
