"""The one-device trainer: block after block equals the whole local loss, statistics, warm-up, failures."""

import copy
import json

import pytest
import timm
import torch

import lfnnify
from lfnnify.data import SyntheticImages, make_loader
from tests.models import batch


def _net(**kwargs):
    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    return lfnnify.convert(model, blocks=kwargs.pop("blocks", 3), example_input=torch.zeros(1, 1, 16, 16), **kwargs)


def _sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _loader(n=64, batch_size=16, seed=0):
    return make_loader(SyntheticImages(n, shape=(1, 16, 16)), batch_size=batch_size, seed=seed)


def test_block_after_block_equals_one_backward_of_the_summed_local_losses():
    net = _net(workers=4, leaders=0.5)
    reference = copy.deepcopy(net)
    x, y = batch(16, n=8, channels=1), torch.randint(0, 10, (8,))
    trainer = lfnnify.Trainer(net, optimizer=_sgd(), progress=False)
    torch.manual_seed(5)
    trainer.train_step(x, y)

    torch.manual_seed(5)
    reference.train()
    reference.local_losses(x, y).backward()
    with torch.no_grad():
        for p in reference.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_one_optimizer_per_block_and_every_block_learns():
    net = _net(blocks=4)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(), progress=False)
    assert len(trainer.optimizers) == 4
    owned = [sum(p.numel() for p in g) for g in trainer.groups]
    assert sum(owned) == sum(p.numel() for p in net.parameters())
    before = copy.deepcopy(net.state_dict())
    trainer.train_step(batch(16, n=8, channels=1), torch.randint(0, 10, (8,)))
    for k in range(4):
        assert any(not torch.equal(before[n], t) for n, t in net.state_dict().items() if n.startswith(f"blocks.{k}."))


def test_fit_counts_steps_and_stops_at_max_steps(tmp_path):
    trainer = lfnnify.Trainer(_net(), optimizer=_sgd(), progress=False, log_path=tmp_path / "log.jsonl", log_every=1)
    history = trainer.fit(_loader(), epochs=5, max_steps=6)
    assert trainer.step == 6 and trainer.epoch == 1 and trainer.step_in_epoch == 2
    assert history[-1]["step"] == 6
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 6 and len(steps[0]["block_losses"]) == 3 and len(steps[0]["block_accuracy"]) == 3


def test_evaluate_reports_every_head():
    trainer = lfnnify.Trainer(_net(workers=2), optimizer=_sgd(), progress=False)
    metrics = trainer.evaluate(_loader())
    assert set(metrics) >= {"accuracy", "loss", "block_accuracy", "worker_accuracy"}
    assert len(metrics["block_accuracy"]) == 3 and metrics["block_accuracy"][-1] == metrics["accuracy"]
    assert [len(w) for w in metrics["worker_accuracy"]] == [2, 2]


def test_leadership_statistics_and_plot(tmp_path):
    net = _net(workers=4, leaders=0.5)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(), progress=False)
    trainer.fit(_loader(n=64, batch_size=16), epochs=2)
    assert len(trainer.leadership) == 2
    for epoch in trainer.leadership:
        assert [sum(block) for block in epoch] == [4 * 2, 4 * 2]  # 4 batches x 2 leaders
    png = lfnnify.plot_leadership(trainer.leadership, tmp_path / "leaders.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_reselection_keeps_leaders_for_the_whole_epoch():
    net = _net(workers=4, leaders=0.5)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(), progress=False, reselect="epoch")
    trainer.fit(_loader(n=64, batch_size=16), epochs=1)
    for counts in trainer.leadership[0]:
        assert sorted(counts) == [0, 0, 4, 4]  # the same two workers led all 4 batches


def test_non_finite_loss_names_the_block():
    trainer = lfnnify.Trainer(_net(), optimizer=_sgd(), progress=False)
    x = batch(16, n=4, channels=1)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="block 0's loss is nan at step 0"):
        trainer.train_step(x, torch.tensor([0, 1, 2, 3]))


def test_head_warmup_trains_only_heads_and_classifier():
    net = _net()
    trainer = lfnnify.Trainer(net, optimizer=_sgd(), progress=False, head_warmup_steps=2)
    before = copy.deepcopy(net.state_dict())
    trainer.fit(_loader(), max_steps=2)
    changed = {n for n, t in net.state_dict().items() if not torch.equal(before[n], t)}
    assert changed, "nothing trained"
    trunk = {n for n in changed
             if n.startswith("blocks.") and ".fc." not in n and "running" not in n and "num_batches" not in n}
    assert not trunk, f"trunk weights moved during warm-up: {sorted(trunk)[:4]}"
    assert any(n.startswith("heads.") for n in changed) and any(".fc." in n for n in changed)
    trainer.fit(_loader(), max_steps=3)
    assert any(not torch.equal(before[n], t) for n, t in net.state_dict().items() if n.endswith("conv1.weight"))


def _small(mode="local"):
    # block 0 is one conv whose 8 output channels belong to 4 workers (2 each): its weight rows show which
    # workers a step moved. Small weights: fp16 loss scaling never overflows here.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5))
    return lfnnify.convert(model, cuts=["1"], mode=mode, workers=4, leaders=0.5, follower_weight=0.0, num_classes=5,
                           example_input=batch(8)[:1])


def _one_step(net, **knobs):
    before = [p.detach().clone() for p in net.parameters()]
    trainer = lfnnify.Trainer(net, optimizer=_sgd(knobs.pop("lr", 0.1)), progress=False, **knobs)
    trainer.train_step(batch(8, n=6), torch.tensor([0, 1, 2, 3, 4, 0]))
    return trainer, [p.detach() - b for p, b in zip(net.parameters(), before)]


@pytest.mark.parametrize("amp", ["bf16", "fp16", None])
def test_amp_and_clipping_run(amp):
    # clipping: with SGD at lr=1 a block moves by exactly its clipped gradient, so no block moves more than the bound
    net = _small()
    trainer, deltas = _one_step(net, amp=amp, grad_clip=0.05, lr=1.0)
    norms = []
    for group in trainer.groups:
        ids = {id(p) for p in group}
        norms.append(torch.cat([d.flatten() for p, d in zip(net.parameters(), deltas) if id(p) in ids]).norm())
    assert all(n <= 0.05 * 1.001 for n in norms), norms
    assert any(n >= 0.05 * 0.99 for n in norms), f"the bound never bit: {norms}"
    # the fp16 loss scale is taken out before the step: updates match full precision's, not 1/65536 of them
    _, full = _one_step(_small(), amp=None)
    _, mixed = _one_step(_small(), amp=amp)
    ratio = torch.stack([m.norm() / f.norm() for m, f in zip(mixed, full) if f.norm() > 0]).median()
    assert 0.9 < float(ratio) < 1.1, float(ratio)


def test_lfnn_mode_trains_through_the_trainer():
    # Eq. 1: the global loss reaches block 0's leader channels and never its followers' (λ=0 here, so followers
    # get nothing at all); local mode gives the leaders a different update (no global term)
    updates = {}
    for mode in ("lfnn", "local"):
        trainer, deltas = _one_step(_small(mode))
        rows = deltas[0].view(4, 2, -1).abs().sum(dim=(1, 2))  # block 0's conv weight, per worker
        led = trainer._epoch_counts[0] > 0
        assert led.sum() == 2 and (rows[led] > 0).all() and (rows[~led] == 0).all(), (mode, rows)
        updates[mode] = (deltas[0], led)
    assert torch.equal(updates["lfnn"][1], updates["local"][1])  # the same leaders...
    assert not torch.allclose(updates["lfnn"][0], updates["local"][0])  # ...moved by the global loss too


def test_bad_trainer_knobs():
    net = _net()
    with pytest.raises(ValueError, match="amp='fp8'"):
        lfnnify.Trainer(net, optimizer=_sgd(), amp="fp8")
    with pytest.raises(ValueError, match="reselect='step'"):
        lfnnify.Trainer(net, optimizer=_sgd(), reselect="step")
    with pytest.raises(TypeError, match="lfnnify.convert"):
        lfnnify.Trainer(torch.nn.Linear(1, 1), optimizer=_sgd())
