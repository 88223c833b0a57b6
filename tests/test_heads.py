"""Heads: the paper's, look-ahead heads copied from the next block's first stage, custom heads; what they cost."""

import pytest
import timm
import torch
import torchvision

import lfnnify
from lfnnify.surgery.lookahead import LookaheadHead
from tests.models import batch

X32 = batch(32)[:1]


@pytest.mark.parametrize(
    "build,size",
    [
        (lambda: timm.create_model("resnet18", num_classes=10), 32),
        (lambda: torchvision.models.vgg11_bn(num_classes=10), 32),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10), 32),
    ],
    ids=["timm-resnet18", "tv-vgg11_bn", "timm-vit_tiny"],
)
def test_lookahead_heads_start_as_independent_copies_of_the_next_stage(build, size):
    net = lfnnify.convert(build(), blocks=3, head="lookahead", example_input=batch(size)[:1])
    for k, head in enumerate(net.heads):
        assert isinstance(head, LookaheadHead)
        following = dict(net.blocks[k + 1].named_parameters())
        copied = dict(head.stage.named_parameters())
        assert copied and set(copied) <= set(following)  # the next block's first stage, by its own names
        for name, p in copied.items():
            assert torch.equal(p, following[name]) and p.data_ptr() != following[name].data_ptr(), name
        info = net.plan.blocks[k]
        assert info.head_params == sum(p.numel() for p in head.parameters())  # plan() reports what it costs
        assert info.head_flops > 2 * info.output_shape[1] * 10 and info.head.startswith("lookahead (copies ")
    assert "lookahead heads" in str(net.plan) and "of the model's" in str(net.plan)


def test_a_lookahead_head_predicts_from_one_stage_deeper_and_can_be_refreshed():
    model = timm.create_model("resnet18", num_classes=10).eval()
    net = lfnnify.convert(model, cuts=["layer1", "layer2"], head="lookahead", example_input=X32)
    head = net.heads[0]
    assert head.source == "layer2.0"
    x = batch(32, n=2)
    net.eval()
    with torch.no_grad():
        features = net.blocks[0](x)
        expected = model.layer2[0](features)
        assert torch.equal(head.stage(features), expected)
        assert head(features).shape == (1, 2, 10)
        for p in head.stage.parameters():
            p.add_(1.0)
        assert head.refresh(net.blocks[1]) == len(list(head.stage.parameters()))
        assert torch.equal(head.stage(features), expected)


def test_lookahead_heads_are_block_wise_only():
    with pytest.raises(lfnnify.ConfigError, match=r"head='lookahead' with workers=2.*block-wise only"):
        lfnnify.convert(timm.create_model("resnet18", num_classes=10), blocks=3, head="lookahead", workers=2,
                        example_input=X32)


def test_custom_heads_are_costed_and_checked():
    def small(channels, num_classes, workers):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 16),
                                   torch.nn.ReLU(), torch.nn.Linear(16, num_classes))

    net = lfnnify.convert(timm.create_model("resnet18", num_classes=10), cuts=["layer1"], head=small,
                          example_input=X32)
    assert net.plan.blocks[0].head_params == 64 * 16 + 16 + 16 * 10 + 10  # the head built, not the paper's formula
    assert net.plan.blocks[0].head == "small"

    def wrong(channels, num_classes, workers):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 3))

    with pytest.raises(lfnnify.ConfigError, match=r"returned \(2, 3\) for a batch of 2.*\(2, 10\)"):
        lfnnify.convert(timm.create_model("resnet18", num_classes=10), cuts=["layer1"], head=wrong, example_input=X32)


def test_heads_refreshed_every_n_steps_take_the_next_block_as_it_is_after_the_previous_step():
    net = lfnnify.convert(timm.create_model("resnet18", num_classes=10), cuts=["layer1", "layer2"], head="lookahead",
                          example_input=X32)
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), refresh_heads_every=2,
                              refresh_momentum=0.25, progress=False)
    head, names = net.heads[0], net.heads[0].shared_names(net.blocks[1])
    assert names and len(names) == len(list(head.stage.parameters()))
    copy_of = {n: p.detach().clone() for n, p in head.stage.named_parameters()}  # lr 0: only a refresh moves it
    x, y = batch(32, n=2), torch.tensor([0, 1])
    trainer.train_step(x, y)  # step 0: no refresh
    with torch.no_grad():
        for p in net.blocks[1].parameters():
            p.add_(1.0)
    trainer.train_step(x, y)  # step 1: not a refresh step
    assert all(torch.equal(p, copy_of[n]) for n, p in head.stage.named_parameters())
    trainer.train_step(x, y)  # step 2: 0.25 of the copy, 0.75 of block 1 after step 1
    theirs = dict(net.blocks[1].named_parameters())
    for n, p in head.stage.named_parameters():
        assert torch.allclose(p, 0.25 * copy_of[n] + 0.75 * theirs[n]), n


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(refresh_heads_every=0), r"refresh_heads_every=0 must be a step count >= 1"),
    (dict(refresh_heads_every=5, refresh_momentum=1.0), r"refresh_momentum=1.0 must be a number in \[0, 1\)"),
    (dict(refresh_heads_every=5, head="linear"), r"this model's heads are 'linear'; convert with head='lookahead'"),
])
def test_bad_refresh_settings(kwargs, pattern):
    head = kwargs.pop("head", "lookahead-layer")
    net = lfnnify.convert(timm.create_model("resnet18", num_classes=10), blocks=3, head=head, example_input=X32)
    with pytest.raises(lfnnify.ConfigError, match=pattern):
        lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), **kwargs)
