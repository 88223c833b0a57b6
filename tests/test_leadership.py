"""Leader selection and the leader/follower losses, exactly as METHOD.md states them."""

import pytest
import torch
import torch.nn.functional as F

from lfnnify.surgery.leadership import leader_count, worker_losses


@pytest.mark.parametrize(
    "workers,share,expected", [(1, 1.0, 1), (4, 0.75, 3), (8, 0.7, 6), (10, 0.05, 1), (4, 1.0, 4), (3, 0.5, 2)]
)
def test_leader_count(workers, share, expected):
    assert leader_count(workers, share) == expected


def test_leaders_are_the_lowest_loss_workers_and_losses_match_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, 16, 7, requires_grad=True)
    y = torch.randint(0, 7, (16,))
    out = worker_losses(logits, y, leaders=0.6, follower_weight=0.5)
    ce = torch.stack([F.cross_entropy(logits[w], y) for w in range(5)])
    order = ce.argsort()
    assert out.leaders.tolist() == order[:3].tolist() and out.best == int(order[0])
    probs = logits.softmax(-1)
    followers = order[3:]
    mse = torch.stack([F.mse_loss(probs[f], probs[order[0]].detach()) for f in followers])
    # METHOD.md: the *mean* leader cross-entropy plus λ times the *mean* follower MSE
    assert torch.allclose(out.loss, ce[order[:3]].mean() + 0.5 * mse.mean())


@pytest.mark.parametrize("workers", [1, 4, 16])
def test_block_loss_does_not_grow_with_the_number_of_workers(workers):
    # the same logits repeated for every worker: a sum would scale the loss (and the trunk's learning rate) by N
    torch.manual_seed(2)
    one = torch.randn(1, 32, 10)
    y = torch.randint(0, 10, (32,))
    single = worker_losses(one, y, leaders=1.0).loss
    repeated = worker_losses(one.expand(workers, -1, -1).clone(), y, leaders=1.0).loss
    assert torch.allclose(repeated, single)
    followers = worker_losses(one.expand(workers, -1, -1).clone(), y, leaders=0.5, follower_weight=1.0).loss
    assert torch.allclose(followers, single)  # identical followers: zero MSE, mean CE unchanged


def test_best_leader_gets_no_gradient_from_the_follower_loss():
    torch.manual_seed(1)
    logits = torch.randn(4, 8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    with_followers = worker_losses(logits, y, leaders=0.5, follower_weight=1.0)
    (g1,) = torch.autograd.grad(with_followers.loss, logits)
    without = worker_losses(logits, y, leaders=0.5, follower_weight=0.0)
    (g0,) = torch.autograd.grad(without.loss, logits)
    best = with_followers.best
    assert torch.equal(g1[best], g0[best])
    followers = [w for w in range(4) if w not in with_followers.leaders.tolist()]
    assert all(g0[f].abs().sum() == 0 for f in followers)  # no CE for followers
    assert all(g1[f].abs().sum() > 0 for f in followers)


def test_fixed_leaders_skip_selection():
    logits = torch.randn(4, 8, 5)
    y = torch.randint(0, 5, (8,))
    out = worker_losses(logits, y, leaders=0.5, fixed_leaders=torch.tensor([3, 1]))
    assert out.leaders.tolist() == [3, 1] and out.best == 3
