"""Test error per epoch on Fashion-MNIST: backprop against LFNN-ℓ (K=4 block-wise; K=4, 4 workers, 75% leaders).

Same model (timm resnet18, in_chans=1), seed, data order, augmentation, optimizer and epochs for
every method: SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine decay over all steps, batch 128,
random crop 28 (padding 2) + horizontal flip, one thread.

Reproduce:  python benchmarks/accuracy_fashion_mnist.py --epochs 3 --out benchmarks/results
Quick look: python benchmarks/accuracy_fashion_mnist.py --epochs 1 --train-subset 2000 --methods bp lfnn_k4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, hardware_tag, write_json  # noqa: E402

METHODS = {
    "bp": dict(blocks=None),
    "lfnn_k4": dict(blocks=4, workers=1, leaders=1.0),
    "lfnn_k4_w4_l75": dict(blocks=4, workers=4, leaders=0.75),
}
REFERENCE = {  # measured by the project on this machine's kind (issue 3), test error % after epochs 1/2/3
    "bp": [15.4, 11.5, 10.7],
    "greedy_k4_gap_linear": [19.6, 15.8, 12.9],
}


def _optimizer(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def run_method(name: str, args, train, test) -> dict:
    import timm

    import lfnnify
    from lfnnify.data import make_loader

    torch.manual_seed(args.seed)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    train_loader = make_loader(train, batch_size=args.batch_size, seed=args.seed)
    test_loader = make_loader(test, batch_size=512, shuffle=False)
    total_steps = args.epochs * len(train_loader)
    errors, epoch_seconds = [], []
    if name == "bp":
        opt = _optimizer(model.parameters(), args.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
        # evaluate with the same code path as LFNN: wrap the model in a 1-block conversion
        for epoch in range(args.epochs):
            train_loader.sampler.set_epoch(epoch)
            model.train()
            start = time.perf_counter()
            for x, y in train_loader:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
            epoch_seconds.append(time.perf_counter() - start)
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in test_loader:
                    correct += (model(x).argmax(1) == y).sum().item()
                    total += len(y)
            errors.append(100 * (1 - correct / total))
            print(f"  bp epoch {epoch + 1}: test error {errors[-1]:.2f}% ({epoch_seconds[-1]:.0f} s)", flush=True)
        return {"test_error": errors, "epoch_seconds": epoch_seconds}

    knobs = METHODS[name]
    net = lfnnify.convert(model, blocks=knobs["blocks"], workers=knobs["workers"], leaders=knobs["leaders"],
                          example_input=torch.zeros(1, 1, 28, 28))
    trainer = lfnnify.Trainer(
        net,
        optimizer=lambda ps: _optimizer(ps, args.lr),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps),
        progress=False,
    )
    block_errors = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        trainer.fit(train_loader, epochs=epoch + 1)
        epoch_seconds.append(time.perf_counter() - start)
        metrics = trainer.evaluate(test_loader)
        errors.append(100 * (1 - metrics["accuracy"]))
        block_errors.append([100 * (1 - a) for a in metrics["block_accuracy"]])
        print(f"  {name} epoch {epoch + 1}: test error {errors[-1]:.2f}% (heads: "
              f"{', '.join(f'{e:.1f}' for e in block_errors[-1][:-1])}) ({epoch_seconds[-1]:.0f} s)", flush=True)
    return {"test_error": errors, "block_test_error": block_errors, "epoch_seconds": epoch_seconds,
            "cuts": net.plan.cuts, "leadership": trainer.leadership, "head_params": net.plan.total_head_params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from torch.utils.data import Subset

    from lfnnify.data import FashionMNIST
    from lfnnify.plots import plot_curves

    torch.set_num_threads(args.threads)
    train = FashionMNIST(args.data, train=True, augment=True)
    if args.train_subset:
        train = Subset(train, range(args.train_subset))
    test = FashionMNIST(args.data, train=False)
    env = environment(args.threads)
    results = {}
    for name in args.methods:
        print(f"{name}:", flush=True)
        results[name] = run_method(name, args, train, test)
    payload = {
        "experiment": "accuracy_fashion_mnist",
        "model": "timm resnet18 (in_chans=1, num_classes=10)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "methods": results,
        "reference_test_error": REFERENCE,
        "env_before": env,
        "env": environment(args.threads),
        "command": " ".join(["python", "benchmarks/accuracy_fashion_mnist.py", *sys.argv[1:]]),
    }
    stem = f"accuracy_fashion_mnist-resnet18-{hardware_tag()}-{env['date'][:10]}"
    path = write_json(args.out / f"{stem}.json", payload)
    plot_curves({n: r["test_error"] for n, r in results.items()}, args.out / f"{stem}.png",
                title="Fashion-MNIST, timm resnet18: test error per epoch")
    print(f"\n{'method':<18}" + "".join(f"{'epoch ' + str(e + 1):>10}" for e in range(args.epochs)) + f"{'s/epoch':>10}")
    for name, r in results.items():
        print(f"{name:<18}" + "".join(f"{e:>9.2f}%" for e in r["test_error"])
              + f"{sum(r['epoch_seconds']) / len(r['epoch_seconds']):>10.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
