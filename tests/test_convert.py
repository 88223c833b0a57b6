"""convert(): the converted model computes what the original computes, and leaves it untouched."""

import copy

import pytest
import timm
import torch
import torchvision

import lfnnify
from tests.models import EQUIVALENCE_MODELS, FUNCTIONAL_DROPOUT, batch


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,build,size,blocks", EQUIVALENCE_MODELS, ids=[m[0] for m in EQUIVALENCE_MODELS])
def test_converted_output_equals_original(name, build, size, blocks):
    model = build()
    before = copy.deepcopy(model)
    x = batch(size)
    for k in (blocks,):
        if name in FUNCTIONAL_DROPOUT:  # F.dropout(training=self.training): two graphs, one warning
            with pytest.warns(UserWarning, match="different graphs in train and eval mode"):
                net = lfnnify.convert(model, blocks=k, example_input=x[:1])
        else:
            net = lfnnify.convert(model, blocks=k, example_input=x[:1])
        assert len(net.blocks) == k and len(net.heads) == k - 1
        assert all(isinstance(b, torch.fx.GraphModule) for b in net.blocks)

        model.eval(), net.eval()
        with torch.no_grad():
            assert torch.equal(net(x), model(x)), f"eval output differs at K={k}"

        # train mode: same computation, same random draws (dropout, drop-path), same BN updates
        reference = copy.deepcopy(model).train()
        net.train()
        torch.manual_seed(1)
        expected = reference(x)
        torch.manual_seed(1)
        got = net(x)
        assert torch.equal(got, expected), f"train output differs at K={k}"
        ref_buffers = dict(reference.named_buffers())
        for key, value in net.state_dict().items():
            if key.startswith("blocks.") and key.endswith("running_mean"):
                original = key.split(".", 2)[2]
                assert torch.equal(value, ref_buffers[original]), key
    assert _states_equal(model, before), "convert() changed the user's model"


def test_user_model_untouched_and_independent():
    model = timm.create_model("resnet18", num_classes=10).train()
    before = copy.deepcopy(model)
    net = lfnnify.convert(model, blocks=3, example_input=batch(32)[:1])
    assert model.training, "training flag not restored"
    out = net.local_losses(batch(32, n=4), torch.tensor([0, 1, 2, 3]))
    out.backward()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert _states_equal(model, before), "training the converted model changed the original"
    assert all(p.grad is None for p in model.parameters())


def test_share_parameters_trains_the_model_itself():
    model = timm.create_model("resnet18", num_classes=10)
    net = lfnnify.convert(model, blocks=2, example_input=batch(32)[:1], share_parameters=True)
    assert net.blocks[0].conv1.weight is model.conv1.weight
    before = model.conv1.weight.detach().clone()
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), progress=False)
    trainer.train_step(batch(32, n=4), torch.tensor([0, 1, 2, 3]))
    assert not torch.equal(model.conv1.weight, before)  # the user's own model learned


def test_state_dict_names_map_one_to_one_to_the_original():
    model = timm.create_model("resnet50", num_classes=10)
    net = lfnnify.convert(model, cuts=["layer1", "layer2", "layer3"], example_input=batch(64)[:1])
    original = model.state_dict()
    mapped = {}
    for key, value in net.blocks.state_dict().items():
        mapped[key.split(".", 1)[1]] = value
    assert mapped.keys() == original.keys()
    assert all(torch.equal(mapped[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["resnet101", "resnet152"])
def test_paper_head_parameter_count(name):
    model = timm.create_model(name)  # 1000 classes, as in the paper
    net = lfnnify.convert(model, cuts=["layer1", "layer2", "layer3"], example_input=batch(64)[:1])
    added = sum(p.numel() for p in net.heads.parameters())
    assert added == 256 * 1000 + 512 * 1000 + 1024 * 1000 + 3 * 1000 == 1_795_000
    assert net.plan.total_head_params == added


def test_resnet101_plan_is_balanced():
    plan = lfnnify.plan(timm.create_model("resnet101"), blocks=4)  # 224x224 from pretrained_cfg
    assert len(plan.blocks) == 4 and len(plan.cuts) == 3
    flops = [b.flops + b.head_flops for b in plan.blocks]
    assert max(flops) <= 1.2 * sum(flops) / 4, str(plan)
    assert plan.imbalance <= 1.2
    for b in plan.blocks:
        assert b.flops > 0 and b.params > 0 and b.output_shape
    assert "largest block / mean" in str(plan)


def test_plan_lists_cut_points_by_module_path():
    resnet = [c.name for c in lfnnify.plan(timm.create_model("resnet18"), example_input=batch(32)[:1]).cut_points]
    assert {"act1", "maxpool", "layer1.0", "layer1", "layer2.0", "layer3", "layer4"} <= set(resnet)
    assert not any(n.endswith(("conv1", "conv2", "bn2", ".add")) and n.count(".") >= 2 for n in resnet)

    vgg = [c.name for c in lfnnify.plan(torchvision.models.vgg11(), example_input=batch(32)[:1]).cut_points]
    assert [f"features.{i}" for i in range(20)] == vgg[:20]  # after any layer

    dense = lfnnify.plan(timm.create_model("densenet121"), example_input=batch(64)[:1]).cut_points
    names = {a for c in dense for a in c.aliases}
    assert {"features.transition1", "features.transition2", "features.transition3"} <= names
    assert not any("denselayer" in n for n in names)  # concatenations keep several tensors live

    vit = lfnnify.plan(
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), example_input=batch(32)[:1]
    )
    vit_names = [c.name for c in vit.cut_points]
    assert [f"blocks.{i}" for i in range(11)] == [n for n in vit_names if n.startswith("blocks.")]
    assert not any(".attn" in n or ".mlp" in n for n in vit_names)


def test_explicit_cuts_accept_aliases_and_cut_after_the_module():
    model = timm.create_model("resnet18", num_classes=10)
    x = batch(64)
    net = lfnnify.convert(model, cuts=["layer2.1", "layer1"], example_input=x[:1])
    assert net.plan.cuts == ["layer1", "layer2"]
    net.eval(), model.eval()
    with torch.no_grad():
        expected = model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))
        assert torch.equal(net.blocks[0](x), expected)


@pytest.mark.parametrize("balance", ["time", "params", "memory"])
def test_other_balances(balance, monkeypatch):
    model = timm.create_model("resnet18", num_classes=10)
    if balance == "time":
        # a clock that reads a piece's (or head's) parameter count: "time" must then cut exactly where
        # "params" does, which checks that the measured costs are what the partition balances
        def clock(fn, x):
            return float(sum(p.numel() for p in fn.parameters()))

        monkeypatch.setattr("lfnnify.surgery.analysis._time_fwd_bwd", clock)
    plan = lfnnify.plan(model, blocks=3, balance=balance, example_input=batch(32)[:1])
    assert len(plan.cuts) == 2 and plan.balance == balance
    if balance in ("params", "time"):
        costs = [b.params + b.head_params for b in plan.blocks]
        assert [b.cost for b in plan.blocks] == costs
    if balance == "time":
        assert plan.cuts == lfnnify.plan(model, blocks=3, balance="params", example_input=batch(32)[:1]).cuts
    if balance == "memory":  # equal activation bytes puts the cuts earlier than equal FLOPs does
        by_flops = lfnnify.plan(model, blocks=3, example_input=batch(32)[:1])
        order = [c.name for c in by_flops.cut_points]
        assert [order.index(c) for c in plan.cuts] <= [order.index(c) for c in by_flops.cuts]


def test_filter_wise_heads_are_batched_and_cost_what_they_should():
    model = timm.create_model("resnet18", num_classes=10)
    net = lfnnify.convert(model, blocks=4, workers=8, leaders=0.75, example_input=batch(32)[:1])
    for head, info in zip(net.heads, net.plan.blocks):
        c = info.output_shape[1]
        assert sum(p.numel() for p in head.parameters()) == c * 10 + 8 * 10 == info.head_params
    out = net.local_losses(batch(32, n=4), torch.tensor([0, 1, 2, 3]))
    assert [len(ids) for ids in out.leaders] == [6, 6, 6, 1]
    logits = net.heads[0](net.blocks[0](batch(32)))
    assert logits.shape == (8, 2, 10)


def test_head_pools_globally_whatever_the_input_size():
    model = timm.create_model("resnet18", num_classes=10)
    net = lfnnify.convert(model, blocks=3, example_input=batch(32)[:1]).eval()
    head = net.heads[0]
    for size in (32, 48, 96):
        x = batch(size)
        with torch.no_grad():
            features = net.blocks[0](x)
            expected = features.mean(dim=(2, 3)) @ head.weight[0] + head.bias[0]  # mean over every position
            assert torch.allclose(head(features)[0], expected, atol=1e-5), size
        out = net.local_losses(x, torch.tensor([1, 2]))
        assert torch.isfinite(out.loss)


def test_custom_head_callable():
    def mlp_head(channels, num_classes, workers):
        return torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(channels, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, num_classes),
        )

    net = lfnnify.convert(
        timm.create_model("resnet18", num_classes=10), blocks=3, head=mlp_head, example_input=batch(32)[:1]
    )
    out = net.local_losses(batch(32), torch.tensor([1, 2]))
    out.backward()
    assert all(p.grad is not None for p in net.heads.parameters())


def test_train_and_eval_graphs_that_differ_are_both_kept():
    model = torchvision.models.inception_v3(num_classes=10, aux_logits=True, init_weights=False)
    x = batch(299)
    with pytest.warns(UserWarning, match="different graphs in train and eval mode"):
        net = lfnnify.convert(model, blocks=2, example_input=x[:1])
    model.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    model.train(), net.train()
    torch.manual_seed(3)
    expected = copy.deepcopy(model)(x)
    torch.manual_seed(3)
    got = net(x)
    assert type(got) is type(expected) and torch.equal(got.logits, expected.logits)
    assert torch.equal(got.aux_logits, expected.aux_logits)
    copied = copy.deepcopy(net).eval()  # a deep copy keeps both graphs
    with torch.no_grad():
        assert torch.equal(copied(x), net.eval()(x))
