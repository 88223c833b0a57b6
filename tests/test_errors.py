"""Bad input gets a clear error that names the value, the rule and the fix."""

import pytest
import timm
import torch

import lfnnify
from tests.models import batch


@pytest.fixture(scope="module")
def resnet():
    return timm.create_model("resnet18", num_classes=10)


X = batch(32)[:1]


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"blocks": 0}, ValueError, r"blocks=0 must be an int >= 1"),
        ({"blocks": 40}, lfnnify.CutError, r"blocks=40 but .* has \d+ places where it can be cut.*lfnnify.plan"),
        ({"cuts": ["layer9"]}, lfnnify.CutError, r"'layer9' is not a valid cut point.*lfnnify.plan\(model\)"),
        ({"cuts": ["layer1.0.conv1"]}, lfnnify.CutError, r"not a valid cut point"),
        ({"cuts": "layer1"}, TypeError, r"must be a list of cut names"),
        ({"blocks": 2, "cuts": ["layer1"]}, ValueError, r"blocks= or cuts=, not both"),
        ({"leaders": 0}, ValueError, r"leaders=0 must be a fraction in \(0, 1\]"),
        ({"leaders": 1.5}, ValueError, r"leaders=1.5 must be a fraction"),
        (
            {"cuts": ["layer1"], "workers": 65},
            ValueError,
            r"workers=65 but the activation after 'layer1' has only 64 channels",
        ),
        ({"cuts": ["layer1"], "workers": 6}, ValueError, r"workers=6 does not divide the 64 channels.*divisor"),
        ({"mode": "bp"}, ValueError, r"mode='bp' must be 'local'"),
        ({"balance": "bandwidth"}, ValueError, r"balance='bandwidth' must be one of"),
        ({"head": "mlp"}, ValueError, r"head='mlp' must be one of \('linear', 'lookahead', 'lookahead-layer'\)"),
        ({"follower_weight": -1}, ValueError, r"follower_weight=-1"),
    ],
)
def test_bad_knobs(resnet, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        lfnnify.convert(resnet, example_input=X, **kwargs)


def test_unknown_cut_suggests_close_names(resnet):
    with pytest.raises(lfnnify.CutError, match=r"Did you mean 'layer1'"):
        lfnnify.convert(resnet, cuts=["layer_1"], example_input=X)


def test_model_without_classifier_needs_num_classes():
    headless = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"no classifier .* Pass num_classes=N"):
        lfnnify.convert(headless, blocks=2, example_input=X)
    net = lfnnify.convert(headless, blocks=2, num_classes=7, example_input=X)
    assert net.heads[0](net.blocks[0](X)).shape[-1] == 7


def test_not_a_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        lfnnify.convert(lambda x: x, blocks=2)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            return x * 2
        return x


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3)
        self.gate = _DataDependent()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.gate(self.stem(x)).mean((2, 3)))


def test_untraceable_module_is_named_with_the_fix():
    with pytest.raises(
        lfnnify.TraceError, match=r"inside module 'gate' \(_DataDependent\).*leaf_modules=\[_DataDependent\]"
    ):
        lfnnify.convert(_Net(), blocks=2, example_input=X, fallback=False)
    model = _Net()
    net = lfnnify.convert(model, cuts=["stem"], leaf_modules=[_DataDependent], example_input=X)
    x = batch(32)
    assert torch.equal(net(x), model(x))


def test_untraceable_module_falls_back_to_module_boundaries():
    model = _Net()
    with pytest.warns(UserWarning, match=r"could not trace inside _DataDependent.*kept those modules whole"):
        net = lfnnify.convert(model, blocks=2, example_input=X)
    assert net.plan.cuts in (["stem"], ["gate"])
    x = batch(32)
    assert torch.equal(net(x), model(x))


class _Opaque(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # the model's own forward: nothing to fall back to
            return x
        return -x


def test_untraceable_top_level_forward_still_raises():
    with pytest.raises(lfnnify.TraceError, match=r"in its forward\(\)"):
        lfnnify.convert(_Opaque(), blocks=1, num_classes=2, example_input=X)


class _ShapeChecked(torch.nn.Module):
    """forward() checks its input in Python (untraceable), then runs its children in order."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Dropout(0.5), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 channels, got {x.shape[1]}")
        return self.head(self.stage(self.stem(x))) * self.scale


def test_untraceable_forward_falls_back_to_its_children_in_sequence():
    model = _ShapeChecked()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"could not trace _ShapeChecked.forward\(\).*top-level children"):
        net = lfnnify.convert(model, blocks=2, example_input=X)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the check ran on copies
    x = batch(32)
    net.eval(), model.eval()
    assert torch.equal(net(x), model(x))
    net.train()
    net.local_losses(x, torch.tensor([0, 1])).block_losses[0].backward()
    assert all(p.grad is None for p in net.blocks[1].parameters())  # the block boundary still isolates
    restored = lfnnify.export(net)
    assert type(restored) is _ShapeChecked and torch.equal(restored.eval()(x), net.eval()(x))


def test_children_that_do_not_reproduce_forward_are_not_used():
    with pytest.raises(lfnnify.TraceError, match=r"children \(stem, stage, head\).*compute something else"):
        lfnnify.convert(_ShapeChecked(scale=2.0), blocks=2, example_input=X)
    with pytest.raises(lfnnify.TraceError, match=r"in its forward\(\)"):
        lfnnify.convert(_ShapeChecked(), blocks=2, example_input=X, fallback=False)


def test_example_input_the_model_cannot_take():
    with pytest.raises(ValueError, match=r"could not run on an example input of shape \(1, 3, 2, 2\).*example_input="):
        fixed_size = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
        lfnnify.convert(fixed_size, blocks=2, example_input=torch.randn(1, 3, 2, 2))


def test_an_encoder_without_logits_gets_a_clear_training_error():
    encoder = timm.create_model("resnet18", num_classes=0, global_pool="")  # returns a feature map
    net = lfnnify.convert(encoder, blocks=2, num_classes=10, example_input=X)
    with pytest.raises(ValueError,
                       match=r"output has shape \(2, 512, 1, 1\), not \(batch, classes\) logits.*classifier"):
        net.local_losses(batch(32), torch.tensor([0, 1]))


class _Rescaling(torch.nn.Module):
    """forward() branches on its input's values: torch.fx cannot trace it, and the branch is not taken on small
    inputs, so its children match forward() on the example input but not on every input."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))

    def forward(self, x):
        if x.abs().max() > 100:
            x = x / x.abs().max()
        return self.head(self.stage(self.stem(x)))


def test_a_forward_that_branches_on_values_is_refused_unless_accepted():
    with pytest.raises(lfnnify.TraceError, match=r"branches on the values of its input.*fallback='children'"):
        lfnnify.convert(_Rescaling(), blocks=2, example_input=X)
    model = _Rescaling().eval()
    with pytest.warns(UserWarning, match=r"You accepted it with fallback='children'.*outputs differ"):
        net = lfnnify.convert(model, blocks=2, example_input=X, fallback="children")
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(X), model(X))  # the branch not taken: the same
        big = X * 1000
        assert not torch.allclose(net(big), model(big))  # taken: what the user accepted
    with pytest.raises(lfnnify.ConfigError, match=r"fallback='maybe' must be True"):
        lfnnify.convert(_Rescaling(), blocks=2, example_input=X, fallback="maybe")
