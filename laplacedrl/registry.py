"""The dataset table: every dataset the CLIs accept, each written once with its spec, loader and defaults.

Adding a dataset is one :func:`register` call plus its defaults: for a dataset shipped with the
package an entry in :data:`BUILT_IN` and the two files ``configs/ssl/<name>.yaml`` and
``configs/drl/<name>.yaml``; for one of your own, ``register(Dataset(...))`` from your code before a
CLI's ``main`` runs, with its defaults in the entry (no file needed)::

    register(Dataset("toy", loader=load_toy, spec=DatasetSpec("toy", 3, 3, 8, ...), train_images=24,
                     defaults={"ssl": {"labels": 6}, "drl": {}}))

A loader is called as ``loader(name, data_dir, download=..., check=..., skip_bad=...)`` and returns
``(train, test, spec)`` (:mod:`laplacedrl.images`). Built-in loaders are named as
``"module:function"`` and imported only when a dataset is loaded: this module is plain data (no
torch), so that the config, ``choices`` and ``--help`` can read the names quickly.
"""
import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

from laplacedrl.images import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DIGITS_MEAN,
                                    DIGITS_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, MINIIMAGENET_MEAN,
                                    MINIIMAGENET_SIZE, MINIIMAGENET_STD, MNIST_MEAN, MNIST_STD, DatasetSpec)
from laplacedrl.errors import UserError


@dataclass(frozen=True)
class Dataset:
    """One dataset: its name, how to load it, and what is known before its files are read.

    ``spec``: the :class:`DatasetSpec` as published (None when it depends on the files, as for
    ``imagefolder``); ``train_images``: its training images as published (``--print-config`` sizes
    the schedule with it before a download); ``defaults``: ``{"ssl": {...}, "drl": {...}}`` field
    values that stand in for ``configs/<kind>/<name>.yaml`` (None: the package's YAML files).
    """

    name: str
    loader: Union[str, Callable]
    spec: Optional[DatasetSpec] = None
    train_images: int = 0
    defaults: Optional[dict] = None

    def load(self, data_dir, download: bool = False, check: bool = False, skip_bad: bool = False):
        """``(train, test, spec)`` from the loader."""
        loader = self.loader
        if isinstance(loader, str):
            module, function = loader.split(":")
            loader = getattr(importlib.import_module(module), function)
        return loader(self.name, data_dir, download=download, check=check, skip_bad=skip_bad)


_TABLE: dict = {}


def register(dataset: Dataset) -> Dataset:
    """Add ``dataset`` to the table (a name may be registered once)."""
    if dataset.name in _TABLE:
        raise ValueError(f"dataset {dataset.name!r} is already registered")
    _TABLE[dataset.name] = dataset
    return dataset


def unregister(name: str) -> None:
    """Remove a dataset added with :func:`register` (tests)."""
    _TABLE.pop(name, None)


def names() -> tuple:
    """The registered dataset names, in the order they were registered."""
    return tuple(_TABLE)


def get(name: str) -> Dataset:
    """The entry of ``name``; a UserError naming the choices if there is none."""
    if name not in _TABLE:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(_TABLE)}")
    return _TABLE[name]


def published(name: str):
    """``(training images, DatasetSpec)`` of a dataset as published, without its files (for
    ``--print-config`` before a download); None when its spec depends on the files."""
    entry = get(name)
    return None if entry.spec is None else (entry.train_images, entry.spec)


_LOADERS = "laplacedrl.data.datasets"
BUILT_IN = (
    Dataset("digits", f"{_LOADERS}:load_digits", train_images=1297,
            spec=DatasetSpec("digits", 10, 1, 8, DIGITS_MEAN, DIGITS_STD, crop_pad=1, hflip=False)),
    Dataset("cifar10", f"{_LOADERS}:load_cifar", train_images=50000,
            spec=DatasetSpec("cifar10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD, crop_pad=4, hflip=True)),
    Dataset("cifar100", f"{_LOADERS}:load_cifar", train_images=50000,
            spec=DatasetSpec("cifar100", 100, 3, 32, CIFAR100_MEAN, CIFAR100_STD, crop_pad=4, hflip=True)),
    Dataset("miniimagenet", f"{_LOADERS}:load_images", train_images=50000,
            spec=DatasetSpec("miniimagenet", 100, 3, MINIIMAGENET_SIZE, MINIIMAGENET_MEAN, MINIIMAGENET_STD,
                             crop_pad=8, hflip=True)),
    Dataset("fashion-mnist", f"{_LOADERS}:load_mnist", train_images=60000,
            spec=DatasetSpec("fashion-mnist", 10, 1, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, crop_pad=4,
                             hflip=True)),
    Dataset("mnist", f"{_LOADERS}:load_mnist", train_images=60000,
            spec=DatasetSpec("mnist", 10, 1, 28, MNIST_MEAN, MNIST_STD, crop_pad=4, hflip=False)),
    Dataset("imagefolder", f"{_LOADERS}:load_images"),
)
for _dataset in BUILT_IN:
    register(_dataset)
