"""Labeled subsets: seeded class-balanced draws, and LaplaceNet's label files.

A label file has one ``<name> <class>`` line per labeled image (``16002_airplane.png airplane``,
``image_10508.JPEG n01532829``); the name is an image set's per-image name (see
:mod:`laplacedrl.data.datasets`). Names may contain spaces, class names may not: a line is split at
its last run of whitespace. Blank lines are ignored.
"""

import os
from collections import defaultdict

import numpy as np

from laplacedrl.engine.seeds import split_rng
from laplacedrl.errors import UserError


def balanced_split(targets, n_labeled, num_classes, seed):
    """Draw ``n_labeled`` class-balanced indices of ``targets`` (N,) -> sorted int64 indices.

    Every class gets ``n_labeled // num_classes`` images; the remainder ``r = n_labeled % num_classes``
    gives one extra image to each of ``r`` classes chosen at random. Everything is drawn from the
    label-split stream :func:`~laplacedrl.engine.seeds.split_rng` (first the extra classes, then one
    permutation per class in class order), so the same arguments always give the same split.
    """
    targets = np.asarray(targets, dtype=np.int64)  # (N,)
    if n_labeled > len(targets):
        raise UserError(f"cannot label {n_labeled} images: the training set has only {len(targets)}")
    if n_labeled < num_classes:
        raise UserError(f"cannot label {n_labeled} images: at least one per class ({num_classes}) is needed")
    rng = split_rng(seed)
    quota = np.full(num_classes, n_labeled // num_classes)
    quota[rng.choice(num_classes, n_labeled % num_classes, replace=False)] += 1
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(targets == c)
        if len(members) < quota[c]:
            raise UserError(f"cannot label {n_labeled} images class-balanced: class {c} has only "
                            f"{len(members)} training images, {quota[c]} needed")
        chosen.append(rng.permutation(members)[: quota[c]])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_label_file(path, imageset):
    """Map the lines of label file ``path`` to indices of ``imageset`` -> sorted int64 indices.

    Each line's name must be an image of ``imageset`` whose class is the line's class. A name used
    by images of several classes is resolved by the class; an unknown name or class, a wrong class,
    a name still ambiguous, a repeated image or a line without two fields is a ``UserError`` naming
    ``path:line``.
    """
    lines = _read_lines(path)
    by_name = defaultdict(list)  # name -> image indices
    for i, name in enumerate(imageset.names):
        by_name[name].append(i)
    class_index = {c: k for k, c in enumerate(imageset.classes)}
    seen = {}  # image index -> line number
    for lineno, line in lines:
        where = f"{path}:{lineno}"
        fields = line.rsplit(None, 1)
        if len(fields) != 2:
            raise UserError(f"{where}: expected '<image name> <class>', got '{line}'")
        name, cls = fields
        if cls not in class_index:
            raise UserError(f"{where}: unknown class '{cls}'")
        candidates = by_name.get(name)
        if not candidates:
            raise UserError(f"{where}: no image named '{name}' in the training set")
        matches = [i for i in candidates if imageset.targets[i] == class_index[cls]]
        if not matches:
            true_classes = sorted({imageset.classes[imageset.targets[i]] for i in candidates})
            raise UserError(f"{where}: '{name}' is in class {', '.join(true_classes)}, not '{cls}'")
        if len(matches) > 1:
            raise UserError(f"{where}: {len(matches)} training images of class '{cls}' are named '{name}'")
        if matches[0] in seen:
            raise UserError(f"{where}: '{name}' is listed again (first on line {seen[matches[0]]})")
        seen[matches[0]] = lineno
    if not seen:
        raise UserError(f"{path}: the label file lists no images")
    return np.array(sorted(seen), dtype=np.int64)


def _read_lines(path):
    """``(line number, stripped text)`` of the non-blank lines of ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read label file {path}: {e}") from None


def write_label_file(path, imageset, indices):
    """Write ``imageset.label_line(i)`` for each index (grouped by class) to ``path``, atomically.

    :func:`read_label_file` reads it back to the same sorted indices.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(np.unique(indices)) != len(indices):
        raise ValueError("repeated indices in the labeled set")
    order = np.lexsort((indices, imageset.targets[indices]))  # by class, then index
    lines = [imageset.label_line(int(i)) + "\n" for i in indices[order]]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def labeled_indices(cfg, train, spec) -> np.ndarray:
    """The labeled training indices of a run: ``cfg.label_file`` (LaplaceNet's split format), every
    image with a label when ``cfg.labels`` is 0, else a seeded balanced draw of ``cfg.labels`` among
    them (:func:`balanced_split` with ``cfg.seed``). Errors name the dataset and where it came from
    (``cfg.dataset_source``)."""
    if cfg.label_file:
        return read_label_file(cfg.label_file, train)
    if cfg.labels == 0:
        return np.flatnonzero(np.asarray(train.targets) >= 0).astype(np.int64)
    try:
        return balanced_split(train.targets, cfg.labels, spec.num_classes, cfg.seed)
    except UserError as e:
        where = getattr(cfg, "dataset_source", "")
        raise UserError(f"--labels {cfg.labels} on {cfg.dataset}"
                        + (f" ({where})" if where else "") + f": {e}") from None
