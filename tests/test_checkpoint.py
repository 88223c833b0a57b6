"""Checkpoints: round trip, exact resume, atomic writes, clear errors; export back to timm/torchvision."""

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

import lfnnify
from lfnnify.checkpoint.loading import load_weights_into
from lfnnify.data import FashionMNIST, make_loader
from tests.models import batch

X28 = torch.zeros(1, 1, 28, 28)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)


def _current(ckpt):
    """The folder of a checkpoint's current version (what its CURRENT pointer names)."""
    return ckpt / (ckpt / "CURRENT").read_text().split()[0]


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_rebuilds_a_timm_model_by_name(tmp_path):
    net = lfnnify.convert(timm.create_model("resnet18", in_chans=1, num_classes=10), blocks=3, workers=2,
                          leaders=0.5, example_input=X28)
    lfnnify.save(net, tmp_path / "ckpt")
    back = lfnnify.load(tmp_path / "ckpt")
    assert back.plan.cuts == net.plan.cuts and back.config["workers"] == 2
    assert _states_equal(back, net)
    net.eval(), back.eval()
    x = batch(28, n=3, channels=1)
    with torch.no_grad():
        assert torch.equal(back(x), net(x))


def test_cifar_variant_survives_a_round_trip_and_a_different_architecture_is_refused(tmp_path):
    from lfnnify.app.zoo import create_model

    model = create_model("resnet18", num_classes=10, cifar=True)
    net = lfnnify.convert(model, blocks=2, example_input=batch(32)[:1])
    lfnnify.save(net, tmp_path / "ckpt")
    back = lfnnify.load(tmp_path / "ckpt")
    assert isinstance(back._source.maxpool, torch.nn.Identity)
    x = batch(32)
    net.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(back(x), net(x))
    # same weights, different function (max-pool put back): refused, not silently accepted
    with pytest.raises(lfnnify.CheckpointError, match="computes something else"):
        lfnnify.load(tmp_path / "ckpt", model=timm.create_model("resnet18", num_classes=10))


class _SmallNet(torch.nn.Module):
    """Not timm, not torchvision: load() needs model=. Dropout exercises the RNG on resume."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.drop = torch.nn.Dropout(0.3)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.drop(self.stage(self.stem(x)).mean((2, 3))))


def _run(net, loader, steps, trainer=None):
    trainer = trainer or lfnnify.Trainer(net, optimizer=_sgd, scheduler=_cosine, progress=False)
    trainer.fit(loader, epochs=3, max_steps=steps)
    return trainer


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    data = Subset(FashionMNIST(train=True, augment=True), range(96))  # real data, random augmentation
    torch.manual_seed(0)
    straight = lfnnify.convert(_SmallNet(), cuts=["stem", "stage"], workers=2, leaders=0.5, example_input=X28)
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    torch.manual_seed(1)
    _run(straight, make_loader(data, batch_size=32, seed=3), steps=8)  # crosses an epoch boundary (3 batches/epoch)

    torch.manual_seed(0)
    first = lfnnify.convert(_SmallNet(), cuts=["stem", "stage"], workers=2, leaders=0.5, example_input=X28)
    first.load_state_dict(start)
    torch.manual_seed(1)
    trainer = _run(first, make_loader(data, batch_size=32, seed=3), steps=4)  # stops mid-epoch
    lfnnify.save(first, tmp_path / "ckpt", trainer=trainer)

    torch.manual_seed(123)  # a fresh process would have a different RNG state
    resumed = lfnnify.load(tmp_path / "ckpt", model=_SmallNet())
    trainer = lfnnify.Trainer(resumed, optimizer=_sgd, scheduler=_cosine, progress=False)
    trainer.load_state_dict(lfnnify.read_trainer_state(tmp_path / "ckpt"))
    assert trainer.step == 4 and trainer.epoch == 1 and trainer.step_in_epoch == 1
    _run(resumed, make_loader(data, batch_size=32, seed=3), steps=8, trainer=trainer)
    assert trainer.step == 8
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    net = lfnnify.convert(_SmallNet(), cuts=["stem"], example_input=X28)
    lfnnify.save(net, tmp_path / "ckpt")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lfnnify.checkpoint.files.save_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        lfnnify.save(net, tmp_path / "ckpt")
    monkeypatch.undo()
    back = lfnnify.load(tmp_path / "ckpt", model=_SmallNet())
    assert not _states_equal(back, net)  # the old weights, still readable
    # the pointer and the one complete version; the failed attempt left nothing behind
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["CURRENT", "v000001"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "v000001").iterdir()) == ["lfnnify.json", "model.safetensors"]


def test_a_checkpoint_given_another_architecture_is_refused_by_name(tmp_path):
    net = lfnnify.convert(_SmallNet(), cuts=["stem"], example_input=X28)
    lfnnify.save(net, tmp_path / "ckpt")
    wide, rgb = _SmallNet(), _SmallNet()
    wide.stage[0], wide.fc = torch.nn.Conv2d(8, 32, 3, stride=2, padding=1), torch.nn.Linear(32, 10)
    rgb.stem[0] = torch.nn.Conv2d(3, 8, 3, padding=1)
    shapes = (r"does not fit this (architecture|model): 3 tensor\(s\) differ in shape "
              r"\(e.g. blocks.1.fc.weight: \(10, 16\) saved, \(10, 32\) here; ")
    with pytest.raises(lfnnify.CheckpointError, match=shapes + r"blocks.1.stage.0.bias.*as model="):
        lfnnify.load(tmp_path / "ckpt", model=wide)  # torch's load_state_dict raised its own RuntimeError here
    converted = r"model= given cannot be converted as the saved one was \(cuts \['stem'\], inputs shaped \(1, 1, 28"
    with pytest.raises(lfnnify.CheckpointError, match=converted + r".*as model="):
        lfnnify.load(tmp_path / "ckpt", model=rgb)
    other = lfnnify.convert(wide, cuts=["stem"], example_input=X28)
    with pytest.raises(lfnnify.CheckpointError, match=shapes + r".*Convert the same architecture the same way"):
        load_weights_into(other, tmp_path / "ckpt")
    assert lfnnify.load(tmp_path / "ckpt", model=_SmallNet()).num_blocks == 2  # the right one still loads


def test_not_a_checkpoint_and_truncated_files_give_clear_errors(tmp_path):
    with pytest.raises(lfnnify.CheckpointError, match="does not exist"):
        lfnnify.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lfnnify.CheckpointError, match="has no lfnnify.json"):
        lfnnify.load(tmp_path / "empty")
    net = lfnnify.convert(_SmallNet(), cuts=["stem"], example_input=X28)
    lfnnify.save(net, tmp_path / "ckpt")
    weights = _current(tmp_path / "ckpt") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(lfnnify.CheckpointError, match="model.safetensors is damaged"):
        lfnnify.load(tmp_path / "ckpt", model=_SmallNet())
    with pytest.raises(lfnnify.CheckpointError, match="cannot rebuild by name.*model="):
        lfnnify.save(net, tmp_path / "ok")
        lfnnify.load(tmp_path / "ok")
    with pytest.raises(lfnnify.CheckpointError, match="holds no trainer state"):
        lfnnify.read_trainer_state(tmp_path / "ok")


def test_export_to_timm_loads_with_timm_pretrained_overlay(tmp_path):
    model = timm.create_model("resnet18", in_chans=1, num_classes=7)
    net = lfnnify.convert(model, blocks=3, example_input=X28)
    trainer = lfnnify.Trainer(net, optimizer=_sgd, progress=False)
    trainer.train_step(batch(28, n=8, channels=1), torch.randint(0, 7, (8,)))
    exported = lfnnify.export(net, tmp_path / "resnet18.safetensors")
    assert type(exported) is type(model)
    assert list(exported.state_dict()) == list(model.state_dict())
    reloaded = timm.create_model(
        "resnet18", pretrained=True, in_chans=1, num_classes=7,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "resnet18.safetensors"), num_classes=7),
    )
    x = batch(28, n=3, channels=1)
    net.eval(), exported.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), net(x))
        assert torch.equal(exported(x), net(x))
    assert not _states_equal(exported, model)  # trained weights, not the originals


def test_export_to_torchvision_and_rebuild_by_class(tmp_path):
    model = torchvision.models.resnet18(num_classes=5)
    net = lfnnify.convert(model, blocks=2, example_input=batch(32)[:1])
    lfnnify.Trainer(net, optimizer=_sgd, progress=False).train_step(batch(32, n=4), torch.tensor([0, 1, 2, 3]))
    lfnnify.export(net, tmp_path / "tv.safetensors")
    fresh = torchvision.models.resnet18(num_classes=5)
    fresh.load_state_dict(load_file(str(tmp_path / "tv.safetensors")))
    lfnnify.save(net, tmp_path / "ckpt")
    back = lfnnify.load(tmp_path / "ckpt")  # finds torchvision's resnet18 builder by class and shapes
    x = batch(32, n=2)
    for m in (fresh, back, net):
        m.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x)) and torch.equal(back(x), net(x))


def test_fine_tuning_from_local_pretrained_checkpoints(tmp_path):
    pretrained = timm.create_model("resnet18")  # 1000 classes: the "ImageNet" checkpoint
    save_file(pretrained.state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in pretrained.state_dict().items()}}, tmp_path / "r18.pth")

    via_timm = timm.create_model("resnet18", pretrained=True, num_classes=10,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "r18.safetensors")))
    for path in (tmp_path / "r18.safetensors", tmp_path / "r18.pth"):
        model = lfnnify.load_pretrained(timm.create_model("resnet18", num_classes=10), path)
        assert torch.equal(model.conv1.weight, pretrained.conv1.weight)
        assert model.fc.weight.shape == (10, 512)  # classifier re-initialised for 10 classes
        assert torch.equal(via_timm.layer3[0].conv1.weight, model.layer3[0].conv1.weight)
        net = lfnnify.convert(model, blocks=4, example_input=batch(32)[:1])
        trainer = lfnnify.Trainer(net, optimizer=_sgd, progress=False, head_warmup_steps=1)
        trainer.train_step(batch(32, n=4), torch.tensor([0, 1, 2, 3]))
        assert torch.equal(net.blocks[0].conv1.weight, pretrained.conv1.weight)  # warm-up kept features

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    model = lfnnify.load_pretrained(torchvision.models.resnet18(num_classes=3), tmp_path / "tv.pth")
    assert torch.equal(model.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)


def test_pretrained_files_that_are_not_weights_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _SmallNet}, tmp_path / "evil.pth")
    with pytest.raises(lfnnify.CheckpointError, match="weights-only"):
        lfnnify.load_pretrained(_SmallNet(), tmp_path / "evil.pth")
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(lfnnify.CheckpointError, match="does not fit _SmallNet"):
        lfnnify.load_pretrained(_SmallNet(), tmp_path / "other.safetensors")
