"""Run by torchrun from tests/test_pipeline.py: every rank runs this same script (not a test module)."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lfnnify  # noqa: E402
from lfnnify.data import SyntheticImages, make_loader  # noqa: E402

# shared with the single-process reference in the test
SIZE, BATCH, DATA = 16, 16, 72  # 72 images: the last batch of each epoch has 8, not 16


def build(blocks, mode="local", local_weight=0.0, plain=False, head="linear"):
    import timm

    torch.manual_seed(0)
    if plain:  # no BatchNorm and one worker: replicas averaging gradients equal one process on the doubled batch
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, 10))
        example = torch.zeros(1, 1, SIZE, SIZE)
        return lfnnify.convert(model, blocks=blocks, mode=mode, num_classes=10, example_input=example)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    stash = mode == "replay-stash"  # replay with weight stashing
    workers = dict(workers=2, leaders=0.5) if head == "linear" else {}  # look-ahead heads: one worker
    return lfnnify.convert(model, blocks=blocks, mode="replay" if stash else mode, local_weight=local_weight,
                           weight_stashing=stash, head=head, example_input=torch.zeros(1, 1, SIZE, SIZE), **workers)


def optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def scheduler(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)


def loaders():
    data = SyntheticImages(DATA, shape=(1, SIZE, SIZE), seed=1)
    return make_loader(data, batch_size=BATCH, seed=2), make_loader(data, batch_size=32, shuffle=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", required=True, choices=["train", "fail", "torchvision"])
    parser.add_argument("--blocks", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--send-bf16", action="store_true")
    parser.add_argument("--mode", default="local", choices=["local", "replay", "replay-stash"])
    parser.add_argument("--local-weight", type=float, default=0.0)
    parser.add_argument("--switch-at", type=int, default=None)
    parser.add_argument("--switch-to", default=None)
    parser.add_argument("--plain", action="store_true", help="a small CNN without BatchNorm, one worker per head")
    parser.add_argument("--head", default="linear")
    parser.add_argument("--refresh-every", type=int, default=None)
    args = parser.parse_args()

    if args.scenario == "torchvision":  # a model lfnnify rebuilds by class and weight shapes
        return torchvision_run(args)
    net = (lfnnify.load(args.resume) if args.resume
           else build(args.blocks, args.mode, args.local_weight, args.plain, args.head))
    trainer = lfnnify.PipelineTrainer(net, optimizer=optimizer, scheduler=scheduler, threads=1, timeout_s=20,
                                      progress=False, max_in_flight=2, switch_mode_at=args.switch_at,
                                      switch_to=args.switch_to, refresh_heads_every=args.refresh_every,
                                      refresh_momentum=0.5 if args.refresh_every else 0.0,
                                      send_dtype=torch.bfloat16 if args.send_bf16 else None)
    if args.resume:
        trainer.load_state_dict(lfnnify.read_trainer_state(args.resume, block=trainer.stage))
    if args.scenario == "fail" and trainer.rank == 1:
        original = trainer._stage_step

        def failing(x, y):
            if trainer.step == 2:
                raise RuntimeError("injected failure at step 2")
            return original(x, y)

        trainer._stage_step = failing
    train, test = loaders()
    rank0_data = trainer.first
    trainer.fit(train if rank0_data else None, epochs=10, max_steps=args.steps, val_loader=test if rank0_data else None)
    lfnnify.save(net, args.out / "ckpt", trainer=trainer)
    timings = trainer.stage_timings()
    metrics = trainer.history[-1]
    if trainer.rank == trainer.world - 1:
        (args.out / "report.json").write_text(json.dumps({"timings": timings, "history": trainer.history,
                                                          "metrics": metrics}))
    torch.distributed.destroy_process_group()


def torchvision_run(args):
    import torchvision

    torch.manual_seed(0)
    net = lfnnify.convert(torchvision.models.resnet18(num_classes=10), blocks=args.blocks,
                          example_input=torch.zeros(1, 3, SIZE, SIZE))
    trainer = lfnnify.PipelineTrainer(net, optimizer=optimizer, threads=1, timeout_s=20, progress=False)
    data = SyntheticImages(32, shape=(3, SIZE, SIZE), seed=1)
    trainer.fit(make_loader(data, batch_size=BATCH, seed=2) if trainer.first else None, max_steps=args.steps)
    lfnnify.save(net, args.out / "ckpt", trainer=trainer)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
