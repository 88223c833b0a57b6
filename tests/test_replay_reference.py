"""mode="replay" against an independent reference of delayed end-to-end gradients, written from the definition.

The reference below shares no code with lfnnify's trainers: it keeps every block's weight history explicitly
(``W[k][t]`` are block k's weights before step t), runs each pass with ``torch.func.functional_call`` and a
hand-written SGD, and follows ``../shared/METHOD.md`` ("Delayed end-to-end gradients"):

- at step t every block runs batch t forward with its weights ``W[k][t]`` and passes the output on;
- block k (delay ``D = K-1-k``) then back-propagates batch ``b = t-D``: from its kept input, with its current
  weights ``W[k][t]`` (recompute) or the weights batch b's first pass used, ``W[k][b]`` (weight stashing), it
  back-propagates the gradient block k+1 computed for that batch at step t-1, plus ``local_weight`` times its
  head loss, and hands the gradient of that input to block k-1;
- while ``b < 0`` (filling) the block and its head do not change;
- with weight prediction the first pass of batch t uses the weights predicted for the step its gradient is
  applied at, ``W[k][t] + D·(the block's last update)`` (linear weight prediction), and with stashing the
  delayed gradient is taken at those predicted weights;
- with delay-aware step sizes over N steps (PipeMare's learning-rate rescheduling), block k and its head step at
  step t with ``lr · D^-(1 - min(t/N, 1))`` (the last block, D = 0, at ``lr``);
- with spike compensation (Kosson et al. 2021) block k's trunk, whose gradients are D steps late, moves by
  ``-lr·(m^D·v + (1 - m^D)/(1 - m)·g)`` instead of ``-lr·v`` (``g`` with weight decay, ``v`` SGD's momentum after
  adding ``g``); its head, whose gradients are not late, steps as SGD does.

The head learns from its loss on the block's output in every case; ``local_weight`` only says how much of that
loss reaches the trunk. Everything runs in float64, so that 1e-6 is far above rounding and far below any
change of the method.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import lfnnify

LR, MOMENTUM, DECAY = 0.05, 0.9, 5e-4
STEPS, BATCH = 7, 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 5)).double()


def _net(stash, local_weight, predict=False, spike=False):
    return lfnnify.convert(_model(), cuts=["1", "3"], mode="replay", weight_stashing=stash, weight_prediction=predict,
                           spike_compensation=spike, local_weight=local_weight, num_classes=5,
                           example_input=torch.zeros(1, 1, 8, 8, dtype=torch.float64))


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _sgd(weights, grads, buffers, lr=LR, delay=0):
    """torch.optim.SGD's rule with momentum and weight decay, by hand: the reference owns its optimizer too. With
    ``delay`` D > 0, the spike-compensated step."""
    a, b = MOMENTUM**delay, sum(MOMENTUM**i for i in range(delay))  # b = (1 - m^D) / (1 - m), summed
    new = {}
    for name, w in weights.items():
        g = grads[name] + DECAY * w
        buffers[name] = g.clone() if name not in buffers else MOMENTUM * buffers[name] + g
        new[name] = w - lr * (a * buffers[name] + b * g)
    return new


def _logits(head, weights, features):
    logits = functional_call(head, weights, (features,))
    return logits[0] if logits.dim() == 3 else logits  # one worker: (1, B, classes)


def reference(net, batches, *, stash, local_weight, predict=False, lr_warmup=None, spike=False):
    """The weights of every block and head after ``len(batches)`` steps of delayed end-to-end gradients."""
    blocks, heads = copy.deepcopy(net.blocks), copy.deepcopy(net.heads)  # used as functions only
    K = len(blocks)
    W = [[{n: p.detach().clone() for n, p in b.named_parameters()}] for b in blocks]
    H = [{n: p.detach().clone() for n, p in h.named_parameters()} for h in heads]
    moments = [{} for _ in range(K)]
    head_moments = [{} for _ in range(K - 1)]
    kept = {}  # (k, b): block k's input of batch b
    first_pass = {}  # (k, b): the weights block k's first pass of batch b used
    last_update = [None] * K
    from_above = {}  # (k, b): the gradient of block k's output for batch b, from block k+1
    for t, (x, _) in enumerate(batches):
        h = x
        for k in range(K):
            kept[(k, t)] = h
            w = W[k][t]
            if predict and last_update[k] is not None:
                w = {n: v + (K - 1 - k) * last_update[k][n] for n, v in w.items()}
            first_pass[(k, t)] = w
            h = functional_call(blocks[k], w, (h,)).detach()
        handed = {}
        for k in range(K):
            b = t - (K - 1 - k)
            if b < 0:
                W[k].append(W[k][t])
                continue
            delay = K - 1 - k
            lr = LR if lr_warmup is None or delay == 0 else LR * delay ** -(1 - min(t / lr_warmup, 1))
            x_in = kept.pop((k, b)).clone().requires_grad_(k > 0)
            w = {n: v.clone().requires_grad_() for n, v in (first_pass.pop((k, b)) if stash else W[k][t]).items()}
            out = functional_call(blocks[k], w, (x_in,))
            y_b = batches[b][1]
            if k == K - 1:
                trunk = F.cross_entropy(out, y_b)
            else:
                hw = {n: v.clone().requires_grad_() for n, v in H[k].items()}
                head_loss = F.cross_entropy(_logits(heads[k], hw, out.detach()), y_b)
                head_grads = dict(zip(hw, torch.autograd.grad(head_loss, list(hw.values()))))
                H[k] = _sgd(H[k], head_grads, head_moments[k], lr)
                trunk = (out * from_above.pop((k, b))).sum()
                if local_weight:  # the head as it was before this step's update, held fixed
                    old_head = {n: v.detach() for n, v in hw.items()}
                    trunk = trunk + local_weight * F.cross_entropy(_logits(heads[k], old_head, out), y_b)
            wrt = list(w.values()) + ([x_in] if k > 0 else [])
            grads = torch.autograd.grad(trunk, wrt)
            if k > 0:
                handed[(k - 1, b)] = grads[-1]
            W[k].append(_sgd(W[k][t], dict(zip(w, grads[: len(w)])), moments[k], lr, delay if spike else 0))
            last_update[k] = {n: W[k][-1][n] - W[k][t][n] for n in w}
        from_above.update(handed)
    return [W[k][-1] for k in range(K)], H


def _trainer(net, **settings):
    opt = lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, weight_decay=DECAY)  # noqa: E731
    return lfnnify.Trainer(net, optimizer=opt, progress=False, **settings)


WARMUP = 4  # delay-aware step sizes reach the full rate at step 4 of 7: the ramp and the plateau are both checked


@pytest.mark.parametrize("spike", [False, True], ids=["", "spike-compensated"])
@pytest.mark.parametrize("lr_warmup", [None, WARMUP], ids=["", "delay-lr"])
@pytest.mark.parametrize("predict", [False, True], ids=["", "predicted"])
@pytest.mark.parametrize("local_weight", [0.0, 0.5], ids=["no-local-loss", "local-0.5"])
@pytest.mark.parametrize("stash", [False, True], ids=["recompute", "stash"])
def test_the_trainer_computes_the_reference_delayed_gradients(stash, local_weight, predict, lr_warmup, spike):
    net = _net(stash, local_weight, predict, spike)
    blocks, heads = reference(net, _batches(), stash=stash, local_weight=local_weight, predict=predict,
                              lr_warmup=lr_warmup, spike=spike)
    trainer = _trainer(net, delay_lr_warmup=lr_warmup)
    for x, y in _batches():
        trainer.train_step(x, y)
    for k, expected in enumerate(blocks):
        for name, p in net.blocks[k].named_parameters():
            assert torch.allclose(p, expected[name], rtol=0, atol=1e-6), (k, name, (p - expected[name]).abs().max())
    for k, expected in enumerate(heads):
        for name, p in net.heads[k].named_parameters():
            assert torch.allclose(p, expected[name], rtol=0, atol=1e-6), ("head", k, name)


@pytest.mark.parametrize("other", [dict(stash=True), dict(predict=True), dict(lr_warmup=WARMUP), dict(spike=True)],
                         ids=["stash", "predicted", "delay-lr", "spike-compensated"])
def test_the_reference_tells_the_variants_apart(other):
    # the comparison above can fail: each variant's weights differ from plain recompute's 10x beyond its 1e-6
    net = _net(False, 0.5)
    plain, _ = reference(net, _batches(), stash=False, local_weight=0.5)
    variant, _ = reference(net, _batches(), **{"stash": False, "local_weight": 0.5, **other})
    assert max((plain[k][n] - variant[k][n]).abs().max() for k in range(3) for n in plain[k]) > 1e-5


@pytest.mark.parametrize("local_weight", [0.0, 0.5], ids=["no-local-loss", "local-0.5"])
def test_stash_and_recompute_agree_at_every_step_when_the_weights_stand_still(local_weight):
    # at lr=0 the weights never change, so the stashed weights are the current ones: every gradient handed down,
    # and every loss, must be the same in both (the filling steps of a 3-block run included)
    runs = {}
    for stash in (False, True):
        net = _net(stash, local_weight)
        trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), progress=False)
        steps = []
        for x, y in _batches():
            record = trainer.train_step(x, y)
            steps.append(([None if g is None else g.clone() for g in trainer._grads], record["block_losses"]))
        runs[stash] = steps
    for t, ((grads_r, losses_r), (grads_s, losses_s)) in enumerate(zip(runs[False], runs[True])):
        assert losses_r == pytest.approx(losses_s, abs=1e-12), t
        for k, (a, b) in enumerate(zip(grads_r, grads_s)):
            assert (a is None) == (b is None), (t, k)
            if a is not None:
                assert torch.allclose(a, b, rtol=0, atol=1e-12), (t, k, (a - b).norm(), a.norm(), b.norm())


def test_weight_prediction_is_linear_weight_prediction_for_sgd_with_momentum():
    # Kosson et al.'s rule, from the optimizer's own state: block k's first pass uses w - D·lr·v, D = K-1-k
    net = _net(True, 0.0, predict=True)
    trainer = _trainer(net)
    for x, y in _batches()[:5]:
        trainer.train_step(x, y)
    for k in (0, 1):
        stage, opt = trainer.stages[k], trainer.updates[k].optimizer
        predicted = stage._forward_weights()
        for name, p in net.blocks[k].named_parameters():
            v = opt.state[p]["momentum_buffer"]
            assert torch.allclose(predicted[name], p - (2 - k) * LR * v, rtol=0, atol=1e-12), (k, name)


def test_spike_compensation_without_it_misses_the_reference():
    # the trainer with spike compensation against the reference without it: the check above would fail
    net = _net(True, 0.0, spike=True)
    plain, _ = reference(copy.deepcopy(net), _batches(), stash=True, local_weight=0.0)
    trainer = _trainer(net)
    for x, y in _batches():
        trainer.train_step(x, y)
    assert max((p - plain[k][n]).abs().max() for k in range(2) for n, p in net.blocks[k].named_parameters()) > 1e-5


@pytest.mark.parametrize("optimizer", [lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.SGD(ps, lr=0.1),
                                       lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)],
                         ids=["adam", "no-momentum", "nesterov"])
def test_spike_compensation_needs_plain_momentum_sgd(optimizer):
    with pytest.raises(lfnnify.ConfigError, match="spike_compensation=True .* torch.optim.SGD with momentum > 0"):
        lfnnify.Trainer(_net(False, 0.0, spike=True), optimizer=optimizer, progress=False)
