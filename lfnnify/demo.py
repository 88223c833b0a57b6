"""``lfnnify demo``: convert a timm ResNet, show its plan, check it, and train it against backprop briefly."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch


def _data(quick: bool):
    from torch.utils.data import Subset

    from .data import FashionMNIST, SyntheticImages

    try:
        train, test = FashionMNIST(train=True, augment=True), FashionMNIST(train=False)
        source = "Fashion-MNIST (real data, /usr/share/datasets/fashion-mnist)"
    except FileNotFoundError as exc:
        print(f"note: {exc}\n      using synthetic data instead, so the accuracies below mean little")
        train, test = SyntheticImages(4096), SyntheticImages(1024, seed=1)
        source = "synthetic data (Fashion-MNIST not installed)"
    if quick:
        train, test = Subset(train, range(256)), Subset(test, range(256))
    return train, test, source


def run_demo(*, quick: bool = False, out: str | None = None) -> int:
    import timm

    import lfnnify

    from .data import make_loader
    from .plots import plot_curves

    threads = torch.get_num_threads()
    steps = 8 if quick else 300
    out_dir = Path(out) if out else Path("runs") / f"demo-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)

    print("1. convert timm resnet18 (in_chans=1, 10 classes) into 4 blocks")
    start = time.perf_counter()
    net = lfnnify.convert(model, blocks=4, example_input=torch.zeros(1, 1, 28, 28))
    print(f"   done in {time.perf_counter() - start:.2f} s; the original model is untouched\n")
    print(net.plan, "\n")

    x = torch.randn(16, 1, 28, 28)
    model.eval(), net.eval()
    with torch.no_grad():
        same = torch.equal(net(x), model(x))
    print(f"2. the converted model computes what the original computes (eval mode, bit for bit): {same}\n")
    if not same:
        return 1

    train, test, source = _data(quick)
    print(f"3. train for {steps} iterations each, batch 128, {threads} threads, on {source}")
    results = {}
    for name, blocks in (("backprop", 1), ("LFNN-ℓ, K=4", 4)):
        torch.manual_seed(0)
        fresh = timm.create_model("resnet18", in_chans=1, num_classes=10)
        candidate = lfnnify.convert(fresh, blocks=blocks, example_input=torch.zeros(1, 1, 28, 28))
        trainer = lfnnify.Trainer(
            candidate,
            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4),
            scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps),
            progress=False,
        )
        loader = make_loader(train, batch_size=128, seed=0)
        start = time.perf_counter()
        trainer.fit(loader, epochs=10**6, max_steps=steps)
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate(make_loader(test, batch_size=512, shuffle=False))
        results[name] = {"seconds": seconds, "samples_per_s": steps * 128 / seconds, **metrics}
        print(f"   {name:<14} test accuracy {metrics['accuracy']:.4f}   {results[name]['samples_per_s']:7.1f} samples/s"
              + (f"   heads: {', '.join(f'{a:.3f}' for a in metrics['block_accuracy'][:-1])}" if blocks > 1 else ""))

    bp, lf = results["backprop"], results["LFNN-ℓ, K=4"]
    print("\n4. side by side (same model, data order, optimizer and iterations)")
    print(f"   {'':<14}{'test acc':>10}{'samples/s':>12}{'seconds':>10}")
    for name, r in results.items():
        print(f"   {name:<14}{r['accuracy']:>10.4f}{r['samples_per_s']:>12.1f}{r['seconds']:>10.1f}")
    print(f"   On one device LFNN-ℓ runs {lf['samples_per_s'] / bp['samples_per_s']:.2f}x backprop's speed: its "
          f"speed-up comes from running the blocks on separate devices (lfnnify.PipelineTrainer), not here.")
    plot = plot_curves(
        {name: [100 * (1 - a) for a in r["block_accuracy"]] for name, r in results.items()},
        out_dir / "demo_heads.png", xlabel="block (last = model output)", ylabel="test error (%)",
        title=f"after {steps} iterations: test error of each head",
    )
    print(f"\nplot saved to {plot}")
    return 0
