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
    trunk = {n for n in changed if n.startswith("blocks.") and ".fc." not in n and "running" not in n and "num_batches" not in n}
    assert not trunk, f"trunk weights moved during warm-up: {sorted(trunk)[:4]}"
    assert any(n.startswith("heads.") for n in changed) and any(".fc." in n for n in changed)
    trainer.fit(_loader(), max_steps=3)
    assert any(not torch.equal(before[n], t) for n, t in net.state_dict().items() if n.endswith("conv1.weight"))


@pytest.mark.parametrize("amp", ["bf16", None])
def test_amp_and_clipping_run(amp):
    trainer = lfnnify.Trainer(_net(), optimizer=_sgd(0.01), progress=False, amp=amp, grad_clip=1.0)
    record = trainer.train_step(batch(16, n=4, channels=1), torch.tensor([0, 1, 2, 3]))
    assert all(torch.isfinite(torch.tensor(v)) for v in record["block_losses"])


def test_lfnn_mode_trains_through_the_trainer():
    net = _net(mode="lfnn", workers=2, leaders=0.5)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(0.05), progress=False)
    trainer.fit(_loader(), max_steps=3)
    assert trainer.step == 3


def test_bad_trainer_knobs():
    net = _net()
    with pytest.raises(ValueError, match="amp='fp8'"):
        lfnnify.Trainer(net, optimizer=_sgd(), amp="fp8")
    with pytest.raises(ValueError, match="reselect='step'"):
        lfnnify.Trainer(net, optimizer=_sgd(), reselect="step")
    with pytest.raises(TypeError, match="lfnnify.convert"):
        lfnnify.Trainer(torch.nn.Linear(1, 1), optimizer=_sgd())
