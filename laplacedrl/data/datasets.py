"""Datasets: the loaders of image sets with per-image names, and their normalisation / augmentation specs.

``load_dataset(name, data_dir, download)`` returns ``(train, test, spec)``: two :class:`ImageSet`
objects and a :class:`DatasetSpec`. An image set holds integer targets, class names and one name per
image; the name is what LaplaceNet's label files use:

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download). Pixel values 0..16 become
  uint8 ``round(x * 255 / 16)``. Fixed split: ``sklearn.model_selection.train_test_split`` of the
  indices with ``test_size=500, stratify=target, random_state=0``, each side kept in the original
  order -> 1297 train / 500 test images. Classes ``'0'..'9'``; names ``'<index>_<class>.png'``.
- ``cifar10`` / ``cifar100``: torchvision's python-pickle archives under ``data_dir``
  (``cifar-10-batches-py/``, ``cifar-100-python/``; fine labels for CIFAR-100). Names
  ``'<index>_<class>.png'`` with the index counting through the training batches in order (the test
  set counts separately), as in LaplaceNet's unpacked PNGs.
- ``miniimagenet`` / ``imagefolder``: ``data_dir/train/<class>/<image>`` and
  ``data_dir/test/<class>/<image>`` (for miniimagenet also ``data_dir/miniimagenet/train|test``),
  loaded lazily from disk; names are the file names (``image_10508.JPEG``). ``imagefolder`` also
  takes your own labeled + unlabeled images (:mod:`laplacedrl.data.folders`).

``data_dir`` defaults to ``./data``.
"""

import dataclasses
import os
import pickle

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST
from torchvision.datasets.utils import download_and_extract_archive

from laplacedrl import registry
from laplacedrl.data import folders
from laplacedrl.engine.seeds import numpy_rng
from laplacedrl.errors import UserError
from laplacedrl.images import (  # noqa: F401 -- the types and constants, also importable from here
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DEFAULT_DATA_DIR, DIGITS_MEAN, DIGITS_STD,
    FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, MINIIMAGENET_MEAN, MINIIMAGENET_SIZE,
    MINIIMAGENET_STD, MNIST_MEAN, MNIST_STD, ArrayImageSet, DatasetSpec, ImageSet, SubsetImageSet)


CARVE_SEED = 0   # the subset / validation draw is the same for every --seed


def carve(train, test, train_subset: int = 0, val_images: int = 0):
    """``(train, evaluation set, what the evaluation set is)`` after ``--train-subset`` / ``--val-images``.

    One fixed permutation of the training images (the ``carve`` stream of seed 0, whatever
    ``--seed`` is): its first ``val_images`` are held out and replace the test set (for choosing
    hyper-parameters without looking at the test set), the next ``train_subset`` (0 = all the rest)
    are the training set. Without either, ``(train, test, "test")``.
    """
    if not train_subset and not val_images:
        return train, test, "test"
    n = len(train)
    if val_images + (train_subset or 1) > n:
        raise UserError(f"--val-images {val_images} + --train-subset {train_subset} exceed the {n} "
                        f"training images")
    order = numpy_rng(CARVE_SEED, "carve").permutation(n)
    rest = order[val_images:]
    keep = np.sort(rest[:train_subset] if train_subset else rest)
    if val_images:
        return SubsetImageSet(train, keep), SubsetImageSet(train, np.sort(order[:val_images])), "validation"
    return SubsetImageSet(train, keep), test, "test"


def load_run_dataset(cfg):
    """A run's ``(train, evaluation set, spec, what the evaluation set is)``.

    :func:`load_dataset` (image folders checked image by image first, ``--skip-bad-images``), then
    :func:`carve` by --train-subset / --val-images. Your own images (``imagefolder`` with
    ``labeled/`` or ``unlabeled/``) are evaluated on their ``val/`` ("validation") when there is one,
    else on their ``test/`` ("test"), else not at all ("none").
    """
    if cfg.dataset == "imagefolder" and cfg.data_dir and folders.own_layout(cfg.data_dir):
        if cfg.train_subset or cfg.val_images:
            raise UserError("--train-subset / --val-images do not apply to your own images: their labeled/, "
                            "unlabeled/ and val/ folders say which images do what")
        f = folders.load_own(cfg.data_dir, check=True, skip_bad=cfg.skip_bad_images)
        for evaluation, kind in ((f.val, "validation"), (f.test, "test")):
            if evaluation is not None and len(evaluation):
                return f.train, evaluation, f.spec, kind
        return f.train, folders.empty_like(f.train), f.spec, "none"
    train, test, spec = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, check=True,
                                     skip_bad=cfg.skip_bad_images)
    train, evaluation, kind = carve(train, test, cfg.train_subset, cfg.val_images)
    return train, evaluation, spec, kind


def index_names(targets, classes):
    """LaplaceNet's PNG names ``'<index>_<class>.png'`` for images in order."""
    return [f"{i}_{classes[t]}.png" for i, t in enumerate(targets)]


def load_dataset(name, data_dir=None, download=False, check=False, skip_bad=False):
    """Load dataset ``name`` (one of :func:`laplacedrl.registry.names`) -> ``(train, test, spec)``.

    ``data_dir`` defaults to ``./data`` (``digits`` ignores it); ``download`` lets torchvision fetch
    CIFAR archives that are missing. A missing, incomplete or corrupt dataset raises ``UserError``.
    ``imagefolder``: ``check`` opens every image first (:func:`laplacedrl.data.folders.build`);
    your own images without a ``test/`` folder give an empty test set.
    """
    dataset = registry.get(name)
    if name == "imagefolder" and data_dir is None:
        raise UserError("--dataset imagefolder needs --data-dir DIR holding labeled/<class>/* and unlabeled/* "
                        "(your own images) or train/<class>/* and test/<class>/*")
    return dataset.load(data_dir or DEFAULT_DATA_DIR, download=download, check=check, skip_bad=skip_bad)


def load_images(name, data_dir, download=False, check=False, skip_bad=False):
    """Mini-ImageNet or an image folder (:func:`laplacedrl.data.folders.load_folder`; nothing to
    download); ``check`` applies to ``imagefolder`` only."""
    f = folders.load_folder(name, data_dir, check=check and name == "imagefolder", skip_bad=skip_bad)
    return f.train, f.test if f.test is not None else folders.empty_like(f.train), f.spec


# ------------------------------------------------------------------------------------------- digits
def load_digits(name="digits", data_dir=None, download=False, check=False, skip_bad=False):
    """scikit-learn's 8x8 digits with the fixed stratified split described in the module docstring
    (bundled: no folder, nothing to download or check)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = np.rint(digits.images * 255 / 16).astype(np.uint8)[:, :, :, None]  # (1797, 8, 8, 1)
    targets = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=500, stratify=targets, random_state=0)
    classes = [str(c) for c in range(10)]

    def subset(idx):
        idx = np.sort(idx)
        return ArrayImageSet(images[idx], targets[idx], classes, index_names(targets[idx], classes))

    return subset(train_idx), subset(test_idx), registry.get("digits").spec


# -------------------------------------------------------------------------------------------- CIFAR
class _ExistenceCheck:
    """Relaxes torchvision's MD5 check to "the files exist", so that small test archives load.

    Files that exist but do not unpickle are caught (and named) by :func:`load_cifar`.
    """

    def _file_paths(self):
        names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return [os.path.join(self.root, self.base_folder, f) for f in names]

    def _check_integrity(self):
        return all(os.path.isfile(p) for p in self._file_paths())

    def _load_meta(self):
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = list(pickle.load(f, encoding="latin1")[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10(_ExistenceCheck, CIFAR10):
    pass


class _CIFAR100(_ExistenceCheck, CIFAR100):
    pass


_CIFAR = {"cifar10": (_CIFAR10, "CIFAR-10"), "cifar100": (_CIFAR100, "CIFAR-100")}


def load_cifar(name, data_dir, download=False, check=False, skip_bad=False):
    """CIFAR-10/100 from torchvision's pickle archive under ``data_dir`` (fine labels for CIFAR-100;
    the archive is checked as it is read)."""
    cls, title = _CIFAR[name]
    spec = registry.get(name).spec
    num_classes = spec.num_classes
    folder = os.path.join(data_dir, cls.base_folder)
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    where = (f"unpack {cls.filename} ({cls.url}) into {data_dir}/ so that {folder}/ holds "
             f"{', '.join(files)}, or rerun with --download")
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        try:
            download_and_extract_archive(cls.url, data_dir, filename=cls.filename, md5=cls.tgz_md5)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{title} download into {data_dir}/ failed ({e}); {where}") from None
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"{title} not found: {os.path.join(folder, missing[0])} is missing; {where}")

    sets = []
    for train in (True, False):
        try:
            ds = cls(data_dir, train=train)
            targets = np.asarray(ds.targets, dtype=np.int64)
            ok = (len(ds.classes) == num_classes and len(targets) == len(ds.data)
                  and targets.min(initial=0) >= 0 and targets.max(initial=0) < num_classes)
        except Exception:  # noqa: BLE001 -- any unpickling / reshaping failure means a bad file
            ok = False
        if not ok:
            bad = _find_bad_cifar_file(cls, folder, num_classes)
            raise UserError(f"{title} file {bad} is corrupt or not in the python-pickle format; replace it "
                            f"from {cls.filename}, or delete {folder}/ and rerun with --download")
        sets.append(ArrayImageSet(ds.data, targets, ds.classes, index_names(targets, ds.classes)))
    return sets[0], sets[1], spec


def _find_bad_cifar_file(cls, folder, num_classes):
    """The first archive file that does not unpickle to the expected content (else the folder)."""
    meta = os.path.join(folder, cls.meta["filename"])
    try:
        with open(meta, "rb") as f:
            if len(pickle.load(f, encoding="latin1")[cls.meta["key"]]) != num_classes:
                return meta
    except Exception:  # noqa: BLE001
        return meta
    for file_name, _ in cls.train_list + cls.test_list:
        path = os.path.join(folder, file_name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"])
            labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"])
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                return path
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                return path
        except Exception:  # noqa: BLE001
            return path
    return folder


# ------------------------------------------------------------------------------- (Fashion-)MNIST
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle_boot")   # torchvision's names, without spaces or '/'
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
_MNIST = {  # name: (torchvision class, title, classes, folders to look in after data_dir)
    "fashion-mnist": (FashionMNIST, "Fashion-MNIST", FASHION_MNIST_CLASSES, (SYSTEM_FASHION_MNIST,)),
    "mnist": (MNIST, "MNIST", tuple(str(d) for d in range(10)), ()),
}


def _find_idx_files(folder):
    """The four idx files in ``folder`` (each plain or .gz), or None if any is missing."""
    found = []
    for name in MNIST_FILES:
        path = next((os.path.join(folder, name + ext) for ext in ("", ".gz")
                     if os.path.isfile(os.path.join(folder, name + ext))), None)
        if path is None:
            return None
        found.append(path)
    return found


def _read_idx(path, reader):
    """torchvision's idx reader on ``path``, unpacking a .gz copy to a temporary file first."""
    if not path.endswith(".gz"):
        return reader(path).numpy()
    import gzip
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, gzip.open(path, "rb") as src:
        plain = os.path.join(tmp, os.path.basename(path)[:-3])
        with open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return reader(plain).numpy()


def load_mnist(name, data_dir, download=False, check=False, skip_bad=False):
    """Fashion-MNIST or MNIST from the four original idx files (plain or .gz), read with torchvision.

    Looked for in ``data_dir/<FashionMNIST|MNIST>/raw/`` (torchvision's layout), in ``data_dir``
    itself, then (Fashion-MNIST) in Debian's ``/usr/share/datasets/fashion-mnist/``; ``download``
    lets torchvision fetch them into ``data_dir``. Names ``'<index>_<class>.png'`` as for CIFAR.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file
    cls, title, classes, system = _MNIST[name]
    torchvision_raw = os.path.join(data_dir, cls.__name__, "raw")
    folders = [torchvision_raw, data_dir, *system]
    files = next((f for f in map(_find_idx_files, folders) if f), None)
    if files is None and download:
        try:
            cls(data_dir, train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{title} download into {data_dir}/ failed ({e})") from None
        files = _find_idx_files(torchvision_raw)
    if files is None:
        apt = (f", or install Debian's package (apt-get install dataset-{name}, files in "
               f"{system[0]}/)" if system else "")
        raise UserError(f"{title} not found: put {', '.join(MNIST_FILES)} (plain or .gz) in "
                        f"{torchvision_raw}/ or {data_dir}/ (--data-dir), rerun with --download{apt}")
    sets = []
    for images, labels in (files[:2], files[2:]):
        try:
            x = _read_idx(images, read_image_file)                     # (N, 28, 28) uint8
            y = _read_idx(labels, read_label_file).astype(np.int64)    # (N,)
        except (OSError, AssertionError, RuntimeError, ValueError, EOFError) as e:
            raise UserError(f"{title}: {images} or {labels} is not a readable idx file ({type(e).__name__})") from None
        if x.ndim != 3 or len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= len(classes))):
            raise UserError(f"{title}: {images} and {labels} do not hold matching images and labels")
        sets.append(ArrayImageSet(x[:, :, :, None], y, classes, index_names(y, classes)))
    spec = dataclasses.replace(registry.get(name).spec, image_size=sets[0].images.shape[1])
    return sets[0], sets[1], spec
