"""Real data: a 4-block LFNN-ℓ ResNet learns Fashion-MNIST (Debian's dataset-fashion-mnist)."""

import torch
from torch.utils.data import Subset

import lfnnify
from lfnnify.data import FashionMNIST, make_loader


def test_a_four_block_resnet_learns_fashion_mnist():
    # 250 steps of batch 64 of timm's test_resnet (a small ResNet; seconds on one thread): enough to show every
    # block learning from real data
    import timm

    torch.manual_seed(0)
    train = FashionMNIST(train=True)
    test = Subset(FashionMNIST(train=False), range(1000))
    net = lfnnify.convert(timm.create_model("test_resnet", in_chans=1, num_classes=10), blocks=4,
                          example_input=torch.zeros(1, 1, 28, 28))
    trainer = lfnnify.Trainer(net, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), progress=False)
    trainer.fit(make_loader(train, batch_size=64), max_steps=250)
    metrics = trainer.evaluate(make_loader(test, batch_size=500, shuffle=False))
    assert metrics["accuracy"] > 0.55, metrics  # chance is 0.10
    assert all(a > 0.5 for a in metrics["block_accuracy"]), metrics  # every head learned too


def _find_only_in(folder):
    import lfnnify.data as data

    saved = data.FASHION_MNIST_DEBIAN
    data.FASHION_MNIST_DEBIAN = folder / "debian"  # pretend the Debian package is absent
    try:
        return data.find_fashion_mnist(folder)
    finally:
        data.FASHION_MNIST_DEBIAN = saved


def test_fashion_mnist_reader_checks_its_files(tmp_path):
    import gzip

    import pytest

    train = FashionMNIST(train=True)
    assert len(train) == 60000 and train.labels.max() == 9
    x, y = train[0]
    assert x.shape == (1, 28, 28) and abs(float(train.images.float().mean()) / 255 - 0.2860) < 1e-3
    with pytest.raises(FileNotFoundError, match=r"looked in .*nowhere.*apt-get install dataset-fashion-mnist"):
        _find_only_in(tmp_path / "nowhere")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 8))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05"))
    with pytest.raises(ValueError, match="truncated"):
        FashionMNIST(tmp_path, train=True)
