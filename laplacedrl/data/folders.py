"""Image folders: Mini-ImageNet's layout, any ``train/`` + ``test/`` layout, and your own images.

Two layouts of ``--data-dir DATA``:

* benchmark: ``DATA/train/<class>/*`` and ``DATA/test/<class>/*`` (Mini-ImageNet; ``imagefolder``
  with every training image labeled, ``--labels N`` hiding the labels of all but N);
* your own images (``imagefolder`` when ``DATA/labeled/``, ``DATA/unlabeled/`` or
  ``DATA/labels.csv`` exists): ``DATA/labeled/<class>/*`` and/or ``DATA/labels.csv`` (``path,label``
  rows, paths relative to DATA) are the labeled images; every image below ``DATA/unlabeled/`` (any
  depth) that the CSV does not list is unlabeled (its target is -1); optional ``DATA/val/<class>/*``
  and ``DATA/test/<class>/*``. Image names are paths relative to DATA.

Images are served as RGB squares of the folder's size, the most common shorter side among the
training images (Mini-ImageNet: 84): a larger image is resized (bilinear) so that its shorter side
fits, then centre-cropped. :func:`check_images` opens every image once before a run and reports, in
one message, unreadable files, images smaller than the folder's size, empty class folders,
val/test classes the training images do not have and ``labels.csv`` rows that are malformed or name
no image (by the file's line number); ``--skip-bad-images`` leaves those out instead, and says so.
"""
import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from laplacedrl.images import (IMAGENET_MEAN, IMAGENET_STD, MINIIMAGENET_MEAN, MINIIMAGENET_SIZE,
                                      MINIIMAGENET_STD, DatasetSpec, ImageSet)
from laplacedrl.errors import UserError

LISTED = 10          # problems named in the one message; the rest are counted
OWN_MARKERS = ("labeled", "unlabeled", "labels.csv")
log = logging.getLogger("laplacedrl")


class BadImages(UserError):
    """The check before a run found images (or labels.csv rows) it cannot use; the message lists them."""


class FolderImageSet(ImageSet):
    """Images read lazily from files, each returned as an RGB ``size`` x ``size`` image."""

    def __init__(self, paths, targets, classes, size, names=None):
        super().__init__(targets, classes, names or [os.path.basename(p) for p in paths])
        self.paths = list(paths)
        self.size = size

    def pil(self, i):
        image = open_rgb(self.paths[i])
        return image if image.size == (self.size, self.size) else resize_center_crop(image, self.size)


def open_rgb(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def resize_center_crop(image, size):
    """Resize so that the shorter side is ``size``, then crop the central ``size`` x ``size`` square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def is_image(name) -> bool:
    return str(name).lower().endswith(IMG_EXTENSIONS)


def images_below(directory) -> list:
    """Every image file below ``directory`` (any depth), sorted."""
    found = [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files if is_image(f)]
    return sorted(found)


def class_folders(directory) -> dict:
    """``class -> sorted image paths`` of ``directory/<class>/...`` (empty classes kept, as []).
    Class names may not contain whitespace (label files are ``'<name> <class>'`` lines)."""
    if not os.path.isdir(directory):
        raise UserError(f"{directory} is not a directory of class folders")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    spaced = [c for c in classes if c != "".join(c.split())]
    if spaced:
        raise UserError(f"{directory}: class folder '{spaced[0]}' contains whitespace; label files are "
                        "'<file name> <class>' lines, so rename it")
    return {c: images_below(os.path.join(directory, c)) for c in classes}


# ============ the check before a run ============
@dataclass
class Scan:
    """What opening the images found: their ``(width, height)`` and the unreadable ones."""

    sizes: dict              # path -> (w, h)
    unreadable: dict         # path -> reason


def scan(paths, decode: bool) -> Scan:
    """Open every image: headers only (``decode=False``: its size) or fully (``decode=True``: a
    truncated or corrupt file is found here, not in the middle of training)."""
    sizes, unreadable = {}, {}
    for p in paths:
        try:
            with Image.open(p) as image:
                if decode:
                    image.load()
                sizes[p] = image.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            unreadable[p] = reason(e, p)
    return Scan(sizes, unreadable)


def reason(error: Exception, path) -> str:
    """Why ``path`` could not be read, without the path (the message names it in full already)."""
    text = str(error).split("\n")[0]
    for form in (repr(str(path)), str(path)):
        text = text.replace(form, "")
    text = " ".join(text.split()).rstrip(" :")
    return (text[:80] + "...") if len(text) > 80 else (text or type(error).__name__)


def common_size(sizes) -> int:
    """The most common shorter side (ties: the larger)."""
    counts = Counter(min(s) for s in sizes)
    if not counts:
        raise UserError("no readable training images")
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def listing(problems: list) -> str:
    """Up to :data:`LISTED` problems, then how many more."""
    return "; ".join(problems[:LISTED]) + (f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else "")


def report(root, problems: list, skip_bad: bool = False) -> None:
    """One :class:`BadImages` error naming up to :data:`LISTED` problems; with ``skip_bad`` one
    warning line saying how many were left out instead; nothing without problems."""
    if not problems:
        return
    if skip_bad:
        log.warning(f"{root}: --skip-bad-images left out {len(problems)} problem(s): {listing(problems)}")
        return
    raise BadImages(f"{root}: {len(problems)} problem(s) with the images ({listing(problems)}); fix them, or "
                    f"pass --skip-bad-images to leave them out")


@dataclass
class Folder:
    """A loaded folder: training images (targets -1 where unlabeled), its val and test sets (or None)."""

    train: FolderImageSet
    val: Optional[FolderImageSet]
    test: Optional[FolderImageSet]
    spec: DatasetSpec


def build(name, root, labeled: dict, unlabeled: list, evaluation: dict, check: bool, skip_bad: bool,
          size: int = 0, listed=None) -> Folder:
    """Assemble a :class:`Folder` from ``labeled`` (class -> paths), ``unlabeled`` paths and
    ``evaluation`` (``"val"`` / ``"test"`` -> class -> paths or None), checking the images first.

    ``check``: decode every image and refuse problems (or drop them with ``skip_bad``); without it
    only the headers are read (for the size). ``size``: fixed image side (0: the folder's).
    ``listed``: the problems of labels.csv (:func:`read_label_csv`), and the line of each image it
    lists, so that an unreadable one is named by its line too.
    """
    csv_problems, lines = listed or ([], {})
    problems, drop = list(csv_problems), set()
    empty = [c for c, paths in labeled.items() if not paths]
    problems += [f"empty class folder {os.path.join(root, 'labeled' if unlabeled is not None else 'train', c)}"
                 for c in empty]
    classes = sorted(c for c, paths in labeled.items() if paths)
    train_paths = [p for c in classes for p in labeled[c]] + list(unlabeled or [])
    found = scan(train_paths, decode=check)
    problems += [f"{lines[p] + ': ' if p in lines else ''}unreadable {p} ({why})" for p, why in found.unreadable.items()]
    drop |= set(found.unreadable)
    size = size or common_size(s for p, s in found.sizes.items())
    small = [p for p, s in found.sizes.items() if min(s) < size]
    problems += [f"{p} is {found.sizes[p][0]}x{found.sizes[p][1]}, smaller than the folder's {size}x{size}"
                 for p in small]
    drop |= set(small)
    sets = {}
    for split, folders in evaluation.items():
        if folders is None:
            sets[split] = None
            continue
        unknown = [c for c, paths in folders.items() if c not in classes and paths]
        problems += [f"{split} class {c} is not among the training classes" for c in unknown]
        paths = [(p, classes.index(c)) for c in folders if c in classes for p in folders[c]]
        seen = scan([p for p, _ in paths], decode=check)
        problems += [f"unreadable {p} ({why})" for p, why in seen.unreadable.items()]
        paths = [(p, y) for p, y in paths if p not in seen.unreadable]
        sets[split] = FolderImageSet([p for p, _ in paths], [y for _, y in paths], classes, size,
                                     [os.path.relpath(p, root) for p, _ in paths])
    if check:
        report(root, problems, skip_bad)
    if not classes:
        raise UserError(f"{root}: no labeled training images")
    keep = [(p, y) for c in classes for p, y in ((p, classes.index(c)) for p in labeled[c]) if p not in drop]
    keep += [(p, -1) for p in unlabeled or [] if p not in drop]
    train = FolderImageSet([p for p, _ in keep], [y for _, y in keep], classes, size,
                           [os.path.relpath(p, root) for p, _ in keep])
    if name == "miniimagenet":
        spec = DatasetSpec(name, len(classes), 3, size, MINIIMAGENET_MEAN, MINIIMAGENET_STD, crop_pad=8, hflip=True)
    else:
        spec = DatasetSpec(name, len(classes), 3, size, IMAGENET_MEAN, IMAGENET_STD, crop_pad=size // 8, hflip=True)
    return Folder(train, sets.get("val"), sets.get("test"), spec)


# ============ the two layouts ============
def own_layout(data_dir) -> bool:
    """Whether ``data_dir`` holds your own images (labeled/, unlabeled/ or labels.csv)."""
    return any(os.path.exists(os.path.join(data_dir, m)) for m in OWN_MARKERS)


def read_label_csv(data_dir):
    """``(class -> paths, problems, path -> "labels.csv line N")`` of ``DATA/labels.csv``
    (``path,label`` rows; a ``path,label`` header allowed). Lines are the file's (the header is
    line 1); every malformed row and every path that names no image is a problem, and is left out."""
    path = os.path.join(data_dir, "labels.csv")
    out, problems, lines = {}, [], {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if r and any(v.strip() for v in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if rows and [v.strip().lower() for v in rows[0][1]] == ["path", "label"]:
        rows = rows[1:]
    for n, row in rows:
        where = f"labels.csv line {n}"
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            problems.append(f"{where} must be 'path,label', got {','.join(row)!r}")
            continue
        image, label = row[0].strip(), row[1].strip()
        if label != "".join(label.split()):
            problems.append(f"{where}: the label {label!r} contains whitespace")
            continue
        image = os.path.normpath(image if os.path.isabs(image) else os.path.join(data_dir, image))
        if not os.path.isfile(image):
            problems.append(f"{where}: no image {image}")
            continue
        out.setdefault(label, []).append(image)
        lines.setdefault(image, where)
    return out, problems, lines


def load_own(data_dir, check: bool = False, skip_bad: bool = False, size: int = 0) -> Folder:
    """Your own images (see the module docstring)."""
    labeled = class_folders(os.path.join(data_dir, "labeled")) if os.path.isdir(
        os.path.join(data_dir, "labeled")) else {}
    listed = [], {}
    if os.path.isfile(os.path.join(data_dir, "labels.csv")):
        by_label, *listed = read_label_csv(data_dir)
        for label, paths in by_label.items():
            labeled[label] = sorted(set(labeled.get(label, [])) | set(paths))
    known = {os.path.normpath(p) for paths in labeled.values() for p in paths}
    unlabeled = [p for p in images_below(os.path.join(data_dir, "unlabeled")) if os.path.normpath(p) not in known]
    evaluation = {split: class_folders(os.path.join(data_dir, split))
                  if os.path.isdir(os.path.join(data_dir, split)) else None for split in ("val", "test")}
    return build("imagefolder", data_dir, labeled, unlabeled, evaluation, check, skip_bad, size, listed)


def benchmark_root(name, data_dir):
    """The folder holding ``train/`` and ``test/``: ``data_dir`` itself, or ``data_dir/<name>``."""
    for root in (data_dir, os.path.join(data_dir, name)):
        if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "test")):
            return root
    extra = f" (or {os.path.join(data_dir, name)}/train and test)" if name == "miniimagenet" else ""
    own = (f", or your own images: {data_dir}/labeled/<class>/* and {data_dir}/unlabeled/*"
           if name == "imagefolder" else "")
    raise UserError(f"{name} not found: expected {data_dir}/train/<class>/<image> and "
                    f"{data_dir}/test/<class>/<image>{extra}{own}")


def load_benchmark(name, data_dir, check: bool = False, skip_bad: bool = False) -> Folder:
    """Mini-ImageNet (84x84) or any ``train/<class>/*``, ``test/<class>/*`` layout, every training
    image labeled. Mini-ImageNet's test classes must be its training classes."""
    root = benchmark_root(name, data_dir)
    train, test = class_folders(os.path.join(root, "train")), class_folders(os.path.join(root, "test"))
    if name == "miniimagenet" and sorted(c for c in test if test[c]) != sorted(c for c in train if train[c]):
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise UserError(f"{root}: test classes differ from train classes (only in train: "
                        f"{only_train[:5]}, only in test: {only_test[:5]})")
    folder = build(name, root, train, None, {"test": test}, check, skip_bad,
                   MINIIMAGENET_SIZE if name == "miniimagenet" else 0)
    folder.train.names = [os.path.basename(p) for p in folder.train.paths]     # LaplaceNet's split files
    folder.test.names = [os.path.basename(p) for p in folder.test.paths]
    return folder


def load_folder(name, data_dir, check: bool = False, skip_bad: bool = False) -> Folder:
    """Either layout of ``data_dir`` (your own images only for ``imagefolder``)."""
    if name == "imagefolder" and own_layout(data_dir):
        return load_own(data_dir, check, skip_bad)
    return load_benchmark(name, data_dir, check, skip_bad)


def empty_like(images: FolderImageSet) -> FolderImageSet:
    """An empty image set with the classes of ``images`` (a folder without a test set)."""
    return FolderImageSet([], np.zeros(0, dtype=np.int64), images.classes, images.size, [])
