"""Datasets and loaders: Fashion-MNIST from IDX files, synthetic data, and a resumable sampler."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ._checks import is_count
from .errors import ConfigError, DataError, DataNotFoundError

__all__ = [
    "FashionMNIST",
    "SyntheticImages",
    "SeededSampler",
    "SeededItems",
    "WithIndex",
    "make_loader",
    "default_workers",
    "find_fashion_mnist",
    "build_datasets",
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
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); the dataset files are damaged")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - offset != expected:
        raise DataError(f"{path} is truncated: {len(data) - offset} bytes of data, {expected} expected")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*dims)


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    r = Path(root) if root else FASHION_MNIST_DEBIAN  # a folder the user names is the only one tried
    return [r, r / "FashionMNIST" / "raw", r / "fashion-mnist"]


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding Fashion-MNIST's IDX files: ``root`` (or torchvision's layout under it), or, when no
    ``root`` is given, Debian's ``/usr/share/datasets/fashion-mnist``. A ``root`` that does not hold the files
    is an error, never a silent switch to another copy.

    Raises:
        lfnnify.DataError: naming every folder it looked in.
    """
    looked = _candidates(root)
    for folder in looked:
        name = _FILES[True][0]
        if (folder / f"{name}.gz").exists() or (folder / name).exists():
            return folder
    fix = ("pass the folder that holds train-images-idx3-ubyte(.gz), or give no folder to use Debian's copy "
           "(apt-get install dataset-fashion-mnist)" if root else
           "install it with 'apt-get install dataset-fashion-mnist', or pass the folder holding "
           "train-images-idx3-ubyte(.gz)")
    raise DataNotFoundError(f"Fashion-MNIST not found; looked in {', '.join(str(p) for p in looked)}. Fix: {fix}.")


class FashionMNIST(Dataset):
    """Fashion-MNIST read straight from its IDX files; images normalised, shape (1, 28, 28).

    ``augment=True`` applies the standard random crop (28, padding 2) and horizontal flip, drawn from torch's
    random generator (which :func:`make_loader` seeds for every item).
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
            raise DataError(f"{folder}: {len(self.images)} images but {len(self.labels)} labels; the files do not "
                            f"match")
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


class SeededSampler(Sampler[tuple[int, int]]):
    """A shuffling sampler whose order depends only on (seed, epoch), and that can skip ahead.

    It yields ``(index, item_seed)``: every example of every epoch also gets its own random seed, from which its
    augmentation is drawn (see :func:`make_loader`), so the batches are the same whichever process loads them
    and however many loader workers there are. The trainer calls ``set_epoch`` at each epoch and ``skip`` when
    resuming mid-epoch, so a resumed run sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def skip(self, items: int) -> None:
        self.start = items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)  # any seed torch takes
        order = torch.randperm(self.length, generator=g).tolist() if self.shuffle else list(range(self.length))
        seeds = torch.randint(0, 2**62, (self.length,), generator=g).tolist()
        start, self.start = self.start, 0
        return iter(list(zip(order, seeds))[start:])

    def __len__(self) -> int:
        return self.length  # a whole epoch, also while resuming: trainers count an epoch's batches by it


class SeededItems(Dataset):
    """``dataset`` read at ``(index, item_seed)``: the item's random draws (augmentation) come from torch's
    generator seeded with ``item_seed``, inside :func:`torch.random.fork_rng`, so the caller's random state is left
    as it was and the same item looks the same in any process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, item_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed)  # the CPU generator only (torch.manual_seed: 100x slower)
            return self.dataset[index]


class WithIndex(Dataset):
    """``dataset`` whose items come with their position: ``(image, label, index)``. A pipeline with
    ``send_deltas=True`` keys each sample's memory by it (:mod:`lfnnify.pipeline.deltas`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"{len(item)} items" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
            raise DataError(f"item {index} of the dataset given to WithIndex is {got}; WithIndex adds the index to "
                            f"(image, label) pairs. Make the dataset return (image, label)")
        return item[0], item[1], index


def default_workers(dataset: Dataset) -> int:
    """Loader workers for ``dataset``: none for tensors already in memory (Fashion-MNIST, synthetic data: a worker
    costs more than it saves), else one per core but one, at most 8 (decoding images off the training thread)."""
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(inner, (FashionMNIST, SyntheticImages)):
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
    workers: int | None = 0, pin_memory: bool = False, indexed: bool = False,
) -> DataLoader:
    """A DataLoader with a :class:`SeededSampler`: deterministic and resumable, its batches the same for any number
    of ``workers`` (``None``: :func:`default_workers`), which persist across epochs. ``pin_memory`` for GPUs.
    ``indexed``: batches are ``(images, labels, sample indices)`` (:class:`WithIndex`), for ``send_deltas``."""
    if not is_count(batch_size, 1):
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1 (images per batch)")
    workers = default_workers(dataset) if workers is None else workers
    if not is_count(workers, 0):
        raise ConfigError(f"workers={workers!r} must be an int >= 0 (loader processes; 0 loads in this process)")
    return DataLoader(
        SeededItems(WithIndex(dataset) if indexed else dataset),
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), seed=seed, shuffle=shuffle),
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def build_datasets(recipe, *, root: str | None = None, download: bool = False):
    """(train, test, in_chans, classes, input_size) for a recipe's dataset. Never downloads unless asked.

    ``root`` (``--data``) overrides ``data.root``; a folder the user names is the only one tried.
    """
    d = recipe.data
    root = root or d.root
    if d.dataset == "fashion_mnist":
        train, test = FashionMNIST(root, train=True, augment=d.augment), FashionMNIST(root, train=False)
        chans, classes, size = 1, 10, 28
    elif d.dataset in ("cifar10", "cifar100"):
        train, test, classes = _cifar(d.dataset, root or "data/cifar", augment=d.augment, download=download)
        chans, size = 3, 32
    elif d.dataset == "imagefolder":
        size = d.input_size or 224
        train, test = _image_folders(root, size, augment=d.augment)
        chans, classes = 3, len(train.classes)
    else:
        size = d.input_size or 32
        chans = recipe.model.in_chans or 3
        classes = recipe.model.num_classes or 10
        train = SyntheticImages(d.train_subset or 512, shape=(chans, size, size), classes=classes,
                                seed=recipe.train.seed)
        test = SyntheticImages(d.eval_subset or 256, shape=(chans, size, size), classes=classes,
                               seed=recipe.train.seed + 1)
    if d.train_subset:
        train = Subset(train, range(min(d.train_subset, len(train))))
    if d.eval_subset:
        test = Subset(test, range(min(d.eval_subset, len(test))))
    return train, test, chans, classes, d.input_size or size


def _cifar(name: str, folder: str, *, augment: bool, download: bool):
    import torchvision
    from torchvision import transforms as T

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    try:
        normalise = [T.ToTensor(), T.Normalize(mean, std)]
        train = cls(folder, train=True, download=download, transform=T.Compose([*aug, *normalise]))
        test = cls(folder, train=False, download=download, transform=T.Compose([T.ToTensor(), T.Normalize(mean, std)]))
    except RuntimeError as exc:
        raise DataNotFoundError(
            f"{name} not found in {Path(folder).resolve()} (torchvision layout); pass --data DIR, "
            f"or add --download to fetch it ({str(exc).splitlines()[0]})"
        ) from None
    return train, test, 10 if name == "cifar10" else 100


def _image_folders(root: str | None, size: int, *, augment: bool):
    import torchvision
    from torchvision import transforms as T

    if not root:
        raise DataNotFoundError("data.dataset is imagefolder but no folder was given: pass --data DIR (with train/ "
                                "and val/)")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    aug = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment else [T.Resize(size), T.CenterCrop(size)]
    folders = [Path(root) / "train", next((Path(root) / n for n in ("val", "test") if (Path(root) / n).is_dir()),
                                          Path(root) / "val")]
    for f in folders:
        if not f.is_dir():
            raise DataNotFoundError(f"image folder {f} not found: an imagefolder dataset needs {root}/train and "
                                    f"{root}/val")
    train = torchvision.datasets.ImageFolder(folders[0], T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)]),
                                             loader=_read_image)
    test = torchvision.datasets.ImageFolder(
        folders[1], T.Compose([T.Resize(int(size * 1.14)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]),
        loader=_read_image)
    return train, test


def _read_image(path: str):
    """An image file as RGB (as torchvision's default loader reads it); a file that is not one is named."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {exc}); remove or replace the "
                        f"file, and train again") from None
