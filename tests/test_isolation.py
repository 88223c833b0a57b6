"""No gradient crosses a block boundary in LFNN-l; Eq. 1 routes the global loss everywhere."""

import pytest
import timm
import torch
import torchvision

import lfnnify
from tests.models import batch

MODELS = [
    ("timm-resnet18", lambda: timm.create_model("resnet18", num_classes=10), 32),
    ("tv-vgg11_bn", lambda: torchvision.models.vgg11_bn(num_classes=10), 32),
    ("timm-vit_tiny", lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10), 32),
]


@pytest.mark.parametrize("head", ["linear", "lookahead", "lookahead-layer"])
@pytest.mark.parametrize("name,build,size", MODELS, ids=[m[0] for m in MODELS])
def test_each_block_loss_stays_in_its_block(name, build, size, head):
    net = lfnnify.convert(build(), blocks=4, head=head, example_input=batch(size)[:1])
    x, y = batch(size, n=4), torch.tensor([0, 1, 2, 3])
    for k in range(4):
        net.zero_grad(set_to_none=True)
        out = net.local_losses(x, y)
        out.block_losses[k].backward()
        touched = net.blocks_with_gradient()
        assert touched == {k}, f"block {k}'s loss reached blocks {sorted(touched)}"


def test_lfnn_mode_global_loss_reaches_every_block():
    # the same check fails in mode="lfnn": proof that the check above can see leaks
    net = lfnnify.convert(
        timm.create_model("resnet18", num_classes=10), blocks=3, mode="lfnn", example_input=batch(32)[:1]
    )
    out = net.local_losses(batch(32, n=4), torch.tensor([0, 1, 2, 3]))
    net.zero_grad(set_to_none=True)
    out.backward()
    for k, block in enumerate(net.blocks):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()), k
    assert net.blocks_with_gradient() == {0, 1, 2}


def _two_block_net(mode, leaders, follower_weight):
    # block 0 is one conv: output channel c belongs to worker c // 2, so its weight rows
    # show exactly which workers received gradient
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    return lfnnify.convert(
        model,
        cuts=["1"],
        workers=4,
        leaders=leaders,
        mode=mode,
        follower_weight=follower_weight,
        num_classes=5,
        example_input=batch(8)[:1],
    )


def _worker_grad(net):
    g = net.blocks[0].get_submodule("0").weight.grad
    return g.view(4, 2, -1).abs().sum(dim=(1, 2))


@pytest.mark.parametrize("mode", ["local", "lfnn"])
def test_followers_get_no_prediction_or_global_gradient(mode):
    net = _two_block_net(mode, leaders=0.5, follower_weight=0.0)
    out = net.local_losses(batch(8, n=6), torch.tensor([0, 1, 2, 3, 4, 0]))
    out.backward()
    per_worker = _worker_grad(net)
    leaders = set(out.leaders[0].tolist())
    assert len(leaders) == 2
    for w in range(4):
        if w in leaders:
            assert per_worker[w] > 0, f"leader {w} got no gradient ({mode})"
        else:
            assert per_worker[w] == 0, f"follower {w} got gradient in {mode} mode with λ=0"


def test_followers_learn_from_alignment():
    net = _two_block_net("local", leaders=0.5, follower_weight=1.0)
    out = net.local_losses(batch(8, n=6), torch.tensor([0, 1, 2, 3, 4, 0]))
    out.backward()
    assert (_worker_grad(net) > 0).all()
