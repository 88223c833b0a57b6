"""``lfnnify demo``: convert a timm ResNet, print its plan, and check it computes what the original does."""

from __future__ import annotations

import time

import torch


def run_demo(*, quick: bool = False, out: str | None = None) -> int:
    import timm

    import lfnnify

    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    example = torch.randn(1, 1, 28, 28)
    start = time.perf_counter()
    net = lfnnify.convert(model, blocks=4, example_input=example)
    print(f"converted timm resnet18 into {net.num_blocks} blocks in {time.perf_counter() - start:.2f} s\n")
    print(net.plan, "\n")

    x = torch.randn(8, 1, 28, 28)
    model.eval(), net.eval()
    with torch.no_grad():
        same = torch.equal(net(x), model(x))
    print(f"eval-mode output identical to the original model: {same}")
    net.train()
    y = torch.randint(0, 10, (8,))
    out_losses = net.local_losses(x, y)
    out_losses.backward()
    print("one local step, block losses:", [round(v.detach().item(), 3) for v in out_losses.block_losses])
    return 0 if same else 1
