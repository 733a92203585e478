"""Datasets, labeled splits and augmentation (see the submodules for the formats).

The names below are imported when first used, so that the dataset table (:mod:`laplacedrl.data.registry`)
and the image-set types (:mod:`laplacedrl.data.images`) can be read without importing torch.
"""
import importlib

_WHERE = {"AugmentedSubset": "augment", "make_transform": "augment",
          "DatasetSpec": "images", "ImageSet": "images",
          "load_dataset": "datasets", "load_run_dataset": "datasets",
          "balanced_split": "splits", "labeled_indices": "splits", "read_label_file": "splits",
          "write_label_file": "splits"}

__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'laplacedrl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"laplacedrl.data.{_WHERE[name]}"), name)
