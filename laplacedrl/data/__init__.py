"""Datasets, labeled splits and augmentation (see the submodules for the formats)."""

from laplacedrl.data.augment import AugmentedSubset, make_transform
from laplacedrl.data.datasets import DatasetSpec, ImageSet, load_dataset, load_run_dataset
from laplacedrl.data.splits import balanced_split, labeled_indices, read_label_file, write_label_file

__all__ = ["DatasetSpec", "ImageSet", "load_dataset", "balanced_split", "read_label_file",
           "write_label_file", "make_transform", "AugmentedSubset", "labeled_indices", "load_run_dataset"]
