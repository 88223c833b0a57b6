"""Datasets and loaders: Fashion-MNIST from IDX files, synthetic data, and a resumable sampler."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "FashionMNIST",
    "SyntheticImages",
    "SeededSampler",
    "make_loader",
    "find_fashion_mnist",
    "FASHION_MNIST_DEBIAN",
]

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# mean/std of the Fashion-MNIST training images
_MEAN, _STD = 0.2860, 0.3530


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: {len(data) - offset} bytes of data, {expected} expected")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*dims)


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    roots = [Path(root)] if root else []
    roots.append(FASHION_MNIST_DEBIAN)
    paths = []
    for r in roots:
        paths += [r, r / "FashionMNIST" / "raw", r / "fashion-mnist"]
    return paths


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding Fashion-MNIST's IDX files: ``root`` (or torchvision's layout under it),
    else Debian's ``/usr/share/datasets/fashion-mnist``. Raises FileNotFoundError naming where it looked."""
    looked = _candidates(root)
    for folder in looked:
        name = _FILES[True][0]
        if (folder / f"{name}.gz").exists() or (folder / name).exists():
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST not found; looked in {', '.join(str(p) for p in looked)}. Install it with "
        f"'apt-get install dataset-fashion-mnist', or pass the folder holding train-images-idx3-ubyte(.gz)."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST read straight from its IDX files; images normalised, shape (1, 28, 28).

    ``augment=True`` applies the standard random crop (28, padding 2) and horizontal flip,
    drawn from the global torch RNG (so a checkpoint's RNG state makes a resume exact).
    """

    classes = 10

    def __init__(self, root: str | os.PathLike | None = None, *, train: bool = True, augment: bool = False):
        folder = find_fashion_mnist(root)
        images, labels = _FILES[train]

        def pick(name: str) -> Path:
            return folder / f"{name}.gz" if (folder / f"{name}.gz").exists() else folder / name

        self.images = _read_idx(pick(images))
        self.labels = _read_idx(pick(labels)).long()
        if len(self.images) != len(self.labels):
            raise ValueError(f"{folder}: {len(self.images)} images but {len(self.labels)} labels")
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255).sub_(_MEAN).div_(_STD).unsqueeze(0)
        if self.augment:
            padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            image = padded[:, dy : dy + 28, dx : dx + 28]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, self.labels[index]


class SyntheticImages(Dataset):
    """Random images with learnable labels (a fixed random linear rule), for smoke tests and benchmarks."""

    def __init__(self, size: int = 512, *, shape=(1, 28, 28), classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, *shape, generator=g)
        rule = torch.randn(shape[0] * shape[1] * shape[2], classes, generator=g)
        self.labels = (self.images.flatten(1) @ rule).argmax(1)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


class SeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on (seed, epoch), and that can skip ahead.

    The trainer calls ``set_epoch`` at each epoch and ``skip`` when resuming mid-epoch, so a
    resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def skip(self, items: int) -> None:
        self.start = items

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.length  # a whole epoch, also while resuming: trainers count an epoch's batches by it


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader with a :class:`SeededSampler` and its own generator (it never draws from the
    global RNG), in the main process: deterministic, resumable, no extra threads."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), seed=seed, shuffle=shuffle),
        drop_last=drop_last,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
