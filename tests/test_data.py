"""Loaders: a seeded, resumable order whose batches do not depend on how many processes load them."""

import pytest
import torch

import lfnnify
from lfnnify.data import FashionMNIST, SyntheticImages, default_workers, make_loader


def _batches(loader, epoch, n):
    loader.sampler.set_epoch(epoch)
    return [b for _, b in zip(range(n), loader)]


def test_the_same_augmented_batches_with_0_and_2_workers():
    data = FashionMNIST(train=True, augment=True)
    alone, two = (make_loader(data, batch_size=32, seed=5, workers=w) for w in (0, 2))
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(_batches(alone, epoch, 4), _batches(two, epoch, 4)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _batches(make_loader(data, batch_size=32, seed=6), 0, 1)[0][0]
    assert not torch.equal(other, _batches(alone, 0, 1)[0][0])  # the seed matters
    a, b = _batches(alone, 0, 1)[0][0], _batches(alone, 1, 1)[0][0]
    assert not torch.equal(a, b)  # and so does the epoch


def test_a_skip_resumes_the_same_batches_and_loading_leaves_the_random_state_alone():
    loader = make_loader(FashionMNIST(train=True, augment=True), batch_size=16, seed=1)
    whole = _batches(loader, 2, 6)
    loader.sampler.set_epoch(2)
    loader.sampler.skip(3 * 16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    resumed = [b for _, b in zip(range(3), loader)]
    assert torch.equal(torch.get_rng_state(), state)  # dropout and friends draw what they would have drawn
    for (xa, ya), (xb, yb) in zip(whole[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_default_workers_and_bad_workers():
    assert default_workers(SyntheticImages(8)) == 0  # tensors in memory: a worker costs more than it saves
    with pytest.raises(lfnnify.ConfigError, match=r"workers=-1 must be an int >= 0"):
        make_loader(SyntheticImages(8), batch_size=4, workers=-1)
    for batch in (0, 2.0, True):  # refused before the DataLoader raises its own ValueError
        with pytest.raises(lfnnify.ConfigError, match=rf"batch_size={batch!r} must be an int >= 1"):
            make_loader(SyntheticImages(8), batch_size=batch)
