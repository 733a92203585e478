"""The image-set types and the datasets' constants: what the loaders build and the models read.

Plain data (numpy and PIL, no torch) in the package's base layer, below every loader:
:mod:`laplacedrl.data.datasets`, :mod:`laplacedrl.data.folders` and the dataset table
:mod:`laplacedrl.registry` import from here.
"""
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_DATA_DIR = "data"

# Mean / std of the digits train split, pixels scaled to [0, 1] (computed once; a test recomputes them).
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3758,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
MINIIMAGENET_MEAN = tuple(v / 255 for v in (120.40, 115.59, 104.54))
MINIIMAGENET_STD = tuple(v / 255 for v in (70.68, 68.28, 72.55))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MINIIMAGENET_SIZE = 84
# Mean / std of the training images (pixels in [0, 1]); a test recomputes them from the real files
# when they are installed.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass(frozen=True)
class DatasetSpec:
    """What the models and transforms need to know about a dataset.

    ``image_size`` is the side of the square images; ``crop_pad`` the reflect padding of the random
    crop (0: no crop); ``hflip`` whether random horizontal flips are label-preserving.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    crop_pad: int
    hflip: bool


class ImageSet:
    """Images with int64 ``targets`` (N,), ``classes`` (names, indexed by target) and per-image ``names``.

    Subclasses implement :meth:`pil`; this base class is enough for label-file work (tests use it
    as a stub with names and targets only).
    """

    def __init__(self, targets, classes, names):
        self.targets = np.asarray(targets, dtype=np.int64)  # (N,)
        self.classes = list(classes)
        self.names = list(names)
        if len(self.names) != len(self.targets):
            raise ValueError(f"{len(self.names)} names for {len(self.targets)} targets")

    def __len__(self):
        return len(self.targets)

    def pil(self, i):
        """Image ``i`` as a PIL image ('L' for one channel, 'RGB' for three)."""
        raise NotImplementedError

    def label_line(self, i):
        """The label-file line of image ``i``: ``'<name> <class>'``."""
        return f"{self.names[i]} {self.classes[self.targets[i]]}"


class ArrayImageSet(ImageSet):
    """An image set held in memory as a uint8 array ``images`` (N, H, W, C), C = 1 or 3."""

    def __init__(self, images, targets, classes, names):
        super().__init__(targets, classes, names)
        self.images = np.ascontiguousarray(images, dtype=np.uint8)  # (N, H, W, C)
        if self.images.ndim != 4 or len(self.images) != len(self.targets):
            raise ValueError(f"images of shape {self.images.shape} for {len(self.targets)} targets")

    def pil(self, i):
        image = self.images[i]  # (H, W, C)
        if image.shape[2] == 1:
            return Image.fromarray(image[:, :, 0])  # (H, W) uint8 -> mode L
        return Image.fromarray(image)  # (H, W, 3) uint8 -> mode RGB


class SubsetImageSet(ImageSet):
    """The images ``indices`` of another image set (names, targets and classes kept)."""

    def __init__(self, base, indices):
        indices = np.asarray(indices, dtype=np.int64)
        super().__init__(base.targets[indices], base.classes, [base.names[i] for i in indices])
        self.base, self.indices = base, indices

    def pil(self, i):
        return self.base.pil(int(self.indices[i]))

