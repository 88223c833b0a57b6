"""mode="replay": delayed end-to-end gradients, simulated exactly on one device (the pipeline tests compare)."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import lfnnify
from lfnnify.data import SyntheticImages, make_loader

X16 = torch.zeros(1, 1, 16, 16)


def _resnet(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("resnet18", in_chans=1, num_classes=10)


def _batches(n, seed=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _sgd(lr=0.1, momentum=0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


@pytest.mark.parametrize("delay_lr_warmup", [None, 2], ids=["", "delay-lr"])
def test_one_block_replay_is_backprop_exactly(delay_lr_warmup):
    # one block has no delay: delay-aware step sizes leave it at the full rate
    model = _resnet()
    reference = copy.deepcopy(model).train()
    net = lfnnify.convert(model, blocks=1, mode="replay", example_input=X16)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(0.1, 0.9), progress=False, delay_lr_warmup=delay_lr_warmup)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches(4):
        trainer.train_step(x, y)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    ours, theirs = lfnnify.export(net).state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # bit for bit, BatchNorm statistics included


@pytest.mark.parametrize("stash", [False, True], ids=["recompute", "stash"])
@pytest.mark.parametrize("blocks", [2, 3])
def test_the_first_update_of_block_0_is_backprops_gradient_of_batch_0(blocks, stash):
    # block k first steps at step K-1-k, with the gradient of batch 0: every block above computed its share of
    # it before its own first update, so block 0 gets exactly backprop's gradient of batch 0
    model = _resnet(1)
    reference = copy.deepcopy(model).train()
    net = lfnnify.convert(model, blocks=blocks, mode="replay", weight_stashing=stash, example_input=X16)
    before = {n: p.detach().clone() for n, p in net.blocks[0].named_parameters()}
    trainer = lfnnify.Trainer(net, optimizer=_sgd(0.1), progress=False)
    batches = _batches(blocks)
    for step, (x, y) in enumerate(batches):
        trainer.train_step(x, y)
        changed = any(not torch.equal(before[n], p) for n, p in net.blocks[0].named_parameters())
        assert changed == (step == blocks - 1), f"block 0 stepped at step {step}"
    F.cross_entropy(reference(batches[0][0]), batches[0][1]).backward()
    theirs = dict(reference.named_parameters())
    for name, p in net.blocks[0].named_parameters():
        assert torch.allclose(p, before[name] - 0.1 * theirs[name].grad, atol=1e-6), name


@pytest.mark.parametrize("stash", [False, True], ids=["recompute", "stash"])
def test_batchnorm_counts_every_batch_once(stash):
    model = _resnet(2)
    net = lfnnify.convert(model, blocks=3, mode="replay", weight_stashing=stash, example_input=X16)
    shadow = copy.deepcopy(net.blocks[0]).train()  # replays block 0's first passes, one per batch
    trainer = lfnnify.Trainer(net, optimizer=_sgd(0.05), progress=False)
    for x, y in _batches(5):
        weights = {n: p.detach().clone() for n, p in net.blocks[0].named_parameters()}
        with torch.no_grad():
            for n, p in shadow.named_parameters():
                p.copy_(weights[n])  # the weights of the first pass of this batch
            shadow(x)
        trainer.train_step(x, y)
    tracked = [b for n, b in net.blocks[0].named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 5 for b in tracked)  # 5 batches, not 5 + the recomputed ones
    ours = dict(net.blocks[0].named_buffers())
    for name, value in shadow.named_buffers():
        assert torch.allclose(ours[name].float(), value.float(), atol=1e-6), name
    net.eval()
    with torch.no_grad():  # the eval-mode model uses those statistics, as a user expects
        x = _batches(1, seed=9)[0][0]
        assert torch.equal(net(x), lfnnify.export(net).eval()(x))


class _Dropped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.5))
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("stash", [False, True], ids=["recompute", "stash"])
def test_the_delayed_backward_uses_the_first_passes_dropout_mask(stash):
    torch.manual_seed(4)
    model = _Dropped()
    reference = copy.deepcopy(model).train()
    net = lfnnify.convert(model, cuts=["stem"], mode="replay", weight_stashing=stash, example_input=X16)
    before = {n: p.detach().clone() for n, p in net.blocks[0].named_parameters()}
    trainer = lfnnify.Trainer(net, optimizer=_sgd(0.5), progress=False)
    (x0, y0), (x1, y1) = _batches(2, seed=5)
    torch.manual_seed(11)
    trainer.train_step(x0, y0)  # block 0's first pass draws its dropout mask here
    torch.manual_seed(12)
    trainer.train_step(x1, y1)  # ...and recomputes batch 0 here, from another random state
    torch.manual_seed(11)
    F.cross_entropy(reference(x0), y0).backward()  # the same draws: convert keeps them
    theirs = dict(reference.named_parameters())
    for name, p in net.blocks[0].named_parameters():
        assert torch.allclose(p, before[name] - 0.5 * theirs[name].grad, atol=1e-6), name


def test_weight_stashing_back_propagates_through_the_weights_the_first_pass_used():
    # block 0 of 3 first steps at step 2 with batch 0, and again at step 3 with batch 1, whose first pass (step 1)
    # ran before block 0's first update: with stashing its gradient is taken at the initial weights, which a
    # recompute with the updated weights does not do
    states = {}
    for stash in (False, True):
        net = lfnnify.convert(_resnet(8), blocks=3, mode="replay", weight_stashing=stash, example_input=X16)
        trainer = lfnnify.Trainer(net, optimizer=_sgd(0.1), progress=False)
        for step, (x, y) in enumerate(_batches(4)):
            trainer.train_step(x, y)
            if step == 2:
                after_first = {n: p.detach().clone() for n, p in net.blocks[0].named_parameters()}
        states[stash] = (after_first, {n: p.detach().clone() for n, p in net.blocks[0].named_parameters()})
    assert all(torch.equal(states[False][0][n], states[True][0][n]) for n in states[True][0])  # the same first step
    assert any(not torch.allclose(states[False][1][n], states[True][1][n]) for n in states[True][1])  # then not


def test_local_weight_reaches_the_trunk_and_heads_learn_either_way():
    nets = {}
    for weight in (0.0, 1.0):
        net = lfnnify.convert(_resnet(5), blocks=3, mode="replay", local_weight=weight, example_input=X16)
        head = copy.deepcopy(net.heads[0].state_dict())
        trainer = lfnnify.Trainer(net, optimizer=_sgd(0.1), progress=False)
        for x, y in _batches(4):
            trainer.train_step(x, y)
        assert any(not torch.equal(head[k], v) for k, v in net.heads[0].state_dict().items()), weight
        nets[weight] = net
    a, b = (dict(nets[w].blocks[0].named_parameters()) for w in (0.0, 1.0))
    assert any(not torch.allclose(a[n], b[n]) for n in a)  # the local loss changed block 0's update


@pytest.mark.parametrize("stash", [False, True], ids=["recompute", "stash"])
def test_a_resumed_replay_run_ends_where_an_uninterrupted_one_does(tmp_path, stash):
    data = SyntheticImages(80, shape=(1, 16, 16), seed=1)

    def run(steps, net, trainer=None):
        trainer = trainer or lfnnify.Trainer(net, optimizer=_sgd(0.05, 0.9), progress=False)
        trainer.fit(make_loader(data, batch_size=16, seed=2), epochs=3, max_steps=steps)
        return trainer

    knobs = dict(blocks=3, mode="replay", local_weight=0.5, weight_stashing=stash, example_input=X16)
    straight = lfnnify.convert(_resnet(6), **knobs)
    run(8, straight)
    first = lfnnify.convert(_resnet(6), **knobs)
    lfnnify.save(first, tmp_path / "ckpt", trainer=run(3, first))
    resumed = lfnnify.load(tmp_path / "ckpt")
    trainer = lfnnify.Trainer(resumed, optimizer=_sgd(0.05, 0.9), progress=False)
    trainer.load_state_dict(lfnnify.read_trainer_state(tmp_path / "ckpt"))
    assert [len(s._line) for s in trainer.stages.values()] == [2, 1, 0]  # the kept batches came back
    run(8, resumed, trainer)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_replay_needs_a_trainer_and_refuses_fp16():
    net = lfnnify.convert(_resnet(), blocks=2, mode="replay", example_input=X16)
    x, y = _batches(1)[0]
    out = net.local_losses(x, y)
    assert len(out.block_losses) == 2  # the losses are reported...
    with pytest.raises(lfnnify.ConfigError, match="delayed gradients, which need state across steps"):
        out.backward()  # ...but the update needs a trainer
    with pytest.raises(lfnnify.ConfigError, match="amp='fp16' with mode='replay'"):
        lfnnify.Trainer(net, optimizer=_sgd(), amp="fp16")
    with pytest.raises(lfnnify.ConfigError, match=r"local_weight=-0.5 must be a finite number >= 0"):
        lfnnify.convert(_resnet(), blocks=2, mode="replay", local_weight=-0.5, example_input=X16)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"switch_mode_at": 5}, r"switch_mode_at=5, switch_to=None: give both"),
        ({"switch_mode_at": 5, "switch_to": "local"}, r"switch_to='local' with a model converted with mode='local'"),
        ({"switch_mode_at": -1, "switch_to": "replay"}, r"switch_mode_at=-1 must be a step count"),
    ],
)
def test_bad_mode_switches(kwargs, pattern):
    net = lfnnify.convert(_resnet(), blocks=2, example_input=X16)
    with pytest.raises(lfnnify.ConfigError, match=pattern):
        lfnnify.Trainer(net, optimizer=_sgd(), **kwargs)


def test_delay_aware_step_sizes_ramp_from_one_over_the_delay_to_the_full_rate_in_each_replay_period():
    from lfnnify.training.step import ModeSchedule

    schedule = ModeSchedule("local", switch_mode_at=10, switch_to="replay", delay_lr_warmup=4)
    assert [schedule.lr_scale(10 + s, 3) for s in (0, 2, 4, 9)] == pytest.approx([1 / 3, 3**-0.5, 1, 1])
    assert schedule.lr_scale(12, 0) == 1.0  # the last block has no delay
    assert ModeSchedule("replay").lr_scale(0, 3) == 1.0  # off by default
    # the scheduler's rates are left as they were: the scaling is for the step only
    net = lfnnify.convert(_resnet(), blocks=3, mode="replay", example_input=X16)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(0.1), progress=False, delay_lr_warmup=4)
    for x, y in _batches(3):
        trainer.train_step(x, y)
    assert all(g["lr"] == 0.1 for opt in trainer.optimizers for g in opt.param_groups)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(mode="local", delay_lr_warmup=10), r"delay_lr_warmup=10: delay-aware step sizes apply to replay"),
    (dict(mode="replay", delay_lr_warmup=0), r"delay_lr_warmup=0 must be a step count >= 1"),
    (dict(mode="replay", delay_lr_warmup=True), r"delay_lr_warmup=True must be a step count"),
])
def test_delay_aware_step_sizes_need_replay_and_a_step_count(kwargs, pattern):
    mode = kwargs.pop("mode")
    net = lfnnify.convert(_resnet(), blocks=2, mode=mode, example_input=X16)
    with pytest.raises(lfnnify.ConfigError, match=pattern):
        lfnnify.Trainer(net, optimizer=_sgd(), **kwargs)


def test_switching_from_local_to_replay_changes_the_update_at_that_step():
    runs = {}
    for switch in (None, 2):
        net = lfnnify.convert(_resnet(7), blocks=2, example_input=X16)
        trainer = lfnnify.Trainer(net, optimizer=_sgd(0.1), progress=False, switch_mode_at=switch,
                                  switch_to="replay" if switch is not None else None)
        states = []
        for x, y in _batches(4):
            trainer.train_step(x, y)
            states.append({n: p.detach().clone() for n, p in net.blocks[0].named_parameters()})
        runs[switch] = states
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(runs[None], runs[2])]
    # steps 0-1 local in both; at step 2 replay's block 0 waits for its first delayed gradient (no local loss)
    assert same == [True, True, False, False]
    assert all(torch.equal(runs[2][1][k], runs[2][2][k]) for k in runs[2][1])  # block 0's weights held at step 2


@pytest.mark.parametrize("stash", [False, True])
def test_the_plan_states_what_each_block_keeps_between_steps(stash):
    # block k holds K-1-k batches between steps: their inputs, and with stashing the weights each pass used
    net = lfnnify.convert(_resnet(), blocks=3, mode="replay", weight_stashing=stash, example_input=X16)
    trainer = lfnnify.Trainer(net, optimizer=_sgd(), progress=False)
    for x, y in _batches(4):
        trainer.train_step(x, y)
    for info in net.plan.blocks:
        kept = list(trainer.stages[info.index]._line)
        assert len(kept) == info.stored_inputs == 2 - info.index
        assert all(s.x[0].numel() * s.x.element_size() * len(kept) == info.stored_bytes for s in kept)
        weights = sum(sum(w.numel() * w.element_size() for w in s.weights.values()) for s in kept if s.weights)
        assert weights == info.stashed_weight_bytes == (info.stored_inputs * info.params * 4 if stash else 0)
    assert ("weight stashing keeps" in str(net.plan)) == stash
