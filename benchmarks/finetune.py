"""Fine-tuning a pretrained checkpoint: backprop against every pipeline-capable mode, same steps.

1. Pretrain timm resnet18 (in_chans=1, 10 outputs) with backprop on Fashion-MNIST classes 0-4, and save it
   as a safetensors file timm loads (``pretrained_cfg_overlay=dict(file=...)``).
2. Fine-tune it on classes 5-9 (as 5 new classes: the classifier is re-initialised by
   ``lfnnify.load_pretrained``) with backprop and with each pipeline-capable mode, for the same steps, the
   same data order and optimizer; lfnnify's modes first warm their random heads up (``head_warmup_steps``)
   for ``--head-warmup`` extra steps with the trunk frozen, so that every method trains the trunk ``--steps`` steps.
3. Report the test accuracy on classes 5-9 and the training time of each method.

Reproduce:  python benchmarks/finetune.py
Quick look: python benchmarks/finetune.py --pretrain-steps 20 --steps 20 --methods bp replay
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, hardware_tag, write_json  # noqa: E402

METHODS = {  # name -> (label, convert knobs); None = plain backprop
    "bp": ("backprop", None),
    "local": ("LFNN-ℓ, GAP+linear heads", dict(blocks=4)),
    "local_lookahead_layer": ("LFNN-ℓ, look-ahead heads (next layer)", dict(blocks=4, head="lookahead-layer")),
    "replay": ("replay", dict(blocks=4, mode="replay")),
    "replay_stash": ("replay, weight stashing", dict(blocks=4, mode="replay", weight_stashing=True)),
}


def _split(dataset, classes: range):
    """The examples of ``classes``, relabelled 0..len(classes)-1."""
    from torch.utils.data import Dataset

    keep = torch.nonzero((dataset.labels >= classes.start) & (dataset.labels < classes.stop)).flatten().tolist()

    class Part(Dataset):
        def __len__(self):
            return len(keep)

        def __getitem__(self, i):
            x, y = dataset[keep[i]]
            return x, y - classes.start

    return Part()


def _sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def _bp_steps(model, loader, steps: int, lr: float) -> float:
    opt = _sgd(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    done, start = 0, time.perf_counter()
    while done < steps:
        loader.sampler.set_epoch(done // len(loader))
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


@torch.no_grad()
def _accuracy(model, loader) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=235, help="backprop steps on classes 0-4 (1 epoch)")
    parser.add_argument("--steps", type=int, default=235, help="fine-tuning steps on classes 5-9 (1 epoch)")
    parser.add_argument("--head-warmup", type=int, default=20, help="lfnnify's head_warmup_steps")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (pretraining: 0.05)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import timm

    import lfnnify
    from lfnnify.data import FashionMNIST, make_loader

    torch.set_num_threads(args.threads)
    env_before = environment(args.threads)
    train, test = FashionMNIST(train=True, augment=True), FashionMNIST(train=False)
    old, new = range(0, 5), range(5, 10)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = timm.create_model("resnet18", in_chans=1, num_classes=10)
        seconds = _bp_steps(base, make_loader(_split(train, old), batch_size=128, seed=0), args.pretrain_steps, 0.05)
        pre_acc = _accuracy(base, make_loader(_split(test, old), batch_size=500, shuffle=False))
        checkpoint = Path(tmp) / "resnet18_fmnist_0-4.safetensors"
        from safetensors.torch import save_file

        save_file(base.state_dict(), str(checkpoint))
        loaded = timm.create_model("resnet18", pretrained=True, in_chans=1, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=str(checkpoint), num_classes=10))
        assert torch.equal(loaded.conv1.weight, base.conv1.weight)  # timm reads the file we wrote
        print(f"pretrained on classes 0-4 for {args.pretrain_steps} steps ({seconds:.0f} s): test accuracy "
              f"{pre_acc:.4f}; saved as a timm-loadable safetensors file", flush=True)

        loader = make_loader(_split(train, new), batch_size=128, seed=1)
        test_loader = make_loader(_split(test, new), batch_size=500, shuffle=False)
        results = {}
        for name in args.methods:
            label, knobs = METHODS[name]
            torch.manual_seed(1)
            model = lfnnify.load_pretrained(timm.create_model("resnet18", in_chans=1, num_classes=5), checkpoint)
            if knobs is None:
                seconds = _bp_steps(model, loader, args.steps, args.lr)
                accuracy = _accuracy(model, test_loader)
            else:
                net = lfnnify.convert(model, example_input=torch.zeros(1, 1, 28, 28), **knobs)
                trainer = lfnnify.Trainer(
                    net, optimizer=lambda ps: _sgd(ps, args.lr), head_warmup_steps=args.head_warmup, progress=False,
                    scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                        opt, args.steps + args.head_warmup))
                start = time.perf_counter()  # the warm-up steps train only the heads: the trunk gets args.steps
                trainer.fit(loader, epochs=10**6, max_steps=args.steps + args.head_warmup)
                seconds = time.perf_counter() - start
                accuracy = trainer.evaluate(test_loader)["accuracy"]
            results[name] = {"label": label, "test_accuracy": accuracy, "seconds": seconds}
            print(f"  {label:<40} test accuracy {accuracy:.4f}  ({seconds:.0f} s)", flush=True)

    payload = {
        "experiment": "finetune_fashion_mnist",
        "model": "timm resnet18 (in_chans=1); pretrained on classes 0-4, fine-tuned on classes 5-9",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pretrain_test_accuracy": pre_acc,
        "methods": results,
        "env_before": env_before,
        "env": environment(args.threads),
        "command": " ".join(["python", "benchmarks/finetune.py", *sys.argv[1:]]),
    }
    stem = f"finetune-fashion_mnist-resnet18-k4-{hardware_tag()}-{env_before['date'][:10]}"
    path = write_json(args.out / f"{stem}.json", payload)
    if "bp" in results:
        bp = results["bp"]["test_accuracy"]
        others = {n: r for n, r in results.items() if n != "bp"}
        if others:
            best = max(others, key=lambda n: others[n]["test_accuracy"])
            print(f"\nbest mode: {others[best]['label']}, {100 * (others[best]['test_accuracy'] - bp):+.2f} points "
                  f"against backprop (target: within 0.5)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
