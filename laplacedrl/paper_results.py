"""The numbers of Tables 1-5 of "Diffusion Based Representation Learning" (ICML 2023), as data.

Test accuracy in %, WRN-28-2 classifier (LaplaceNet). A table is a list of rows ``(dataset, labels)``
and a list of columns ``(key, header)``; ``value(dataset, labels, key)`` is the paper's number.
Column keys are what ``configs/tables/tables.yaml`` uses to say how each column is run; dataset names
are the ``--dataset`` values of the CLIs.
"""
from __future__ import annotations

from dataclasses import dataclass

DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "miniimagenet": "Mini-ImageNet",
                  "fashion-mnist": "Fashion-MNIST"}


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper.

    Args:
        number: 1..5.
        title: what the table shows (short).
        columns: ``(key, header)`` per column, in the paper's order.
        values: ``(dataset, labels) -> one number per column``, rows in the paper's order.
    """

    number: int
    title: str
    columns: tuple
    values: dict

    @property
    def rows(self) -> list:
        return list(self.values)

    @property
    def keys(self) -> list:
        return [k for k, _ in self.columns]

    def header(self, key: str) -> str:
        return dict(self.columns)[key]

    def value(self, dataset: str, labels: int, key: str) -> float:
        return self.values[(dataset, labels)][self.keys.index(key)]

    def cells(self) -> list:
        """Every cell ``(dataset, labels, key, paper value)``, row by row."""
        return [(d, n, k, v) for (d, n), vals in self.values.items() for k, v in zip(self.keys, vals)]


_T1 = {
    ("cifar10", 100): (73.68, 75.29, 74.31, 64.67, 81.63),
    ("cifar10", 500): (91.31, 92.53, 92.70, 92.31, 92.79),
    ("cifar10", 1000): (92.59, 93.13, 93.24, 93.42, 93.60),
    ("cifar10", 2000): (94.00, 93.96, 94.18, 93.91, 93.96),
    ("cifar10", 4000): (94.73, 94.97, 94.75, 95.22, 95.00),
    ("cifar100", 1000): (55.58, 55.24, 55.85, 55.74, 56.47),
    ("cifar100", 4000): (67.07, 67.25, 67.22, 67.47, 67.54),
    ("cifar100", 10000): (73.19, 72.84, 73.31, 73.66, 73.50),
    ("cifar100", 20000): (75.80, 76.07, 76.46, 76.88, 76.64),
    ("miniimagenet", 4000): (58.40, 58.84, 58.95, 59.29, 59.14),
    ("miniimagenet", 10000): (66.65, 66.80, 67.31, 66.63, 67.46),
}
_T2 = {
    ("cifar10", 100): (64.12, 69.79),
    ("cifar10", 500): (86.24, 88.28),
    ("cifar10", 1000): (87.48, 88.56),
    ("cifar10", 2000): (89.99, 89.52),
    ("cifar10", 4000): (90.15, 91.13),
    ("cifar100", 1000): (45.14, 48.04),
    ("cifar100", 4000): (59.86, 60.34),
    ("cifar100", 10000): (64.83, 65.80),
    ("cifar100", 20000): (65.77, 66.39),
    ("miniimagenet", 4000): (47.18, 50.75),
    ("miniimagenet", 10000): (58.66, 58.62),
}
_T3 = {
    ("cifar10", 100): (64.12, 54.06, 69.79, 67.07, 64.99),
    ("cifar100", 1000): (45.14, 46.28, 48.04, 47.08, 46.88),
    ("miniimagenet", 4000): (47.18, 47.64, 50.75, 50.31, 48.52),
}
_T4 = {
    ("cifar10", 100): (73.68, 74.31, 58.84),
    ("cifar100", 1000): (55.58, 55.85, 55.41),
    ("miniimagenet", 4000): (58.40, 58.95, 57.93),
}
_T5 = {
    ("cifar10", 100): (74.31, 64.67, 70.40, 81.63, 77.51),
    ("cifar10", 500): (92.70, 92.31, 92.55, 92.79, 91.46),
    ("cifar10", 1000): (93.24, 93.42, 93.14, 93.60, 93.33),
    ("cifar10", 2000): (94.18, 93.91, 93.80, 93.96, 94.27),
    ("cifar10", 4000): (94.75, 95.22, 94.75, 95.00, 94.87),
    ("cifar100", 1000): (55.85, 55.74, 55.15, 56.47, 55.65),
    ("cifar100", 4000): (67.22, 67.47, 67.09, 67.54, 67.52),
    ("cifar100", 10000): (73.31, 73.66, 74.36, 73.50, 73.20),
    ("cifar100", 20000): (76.46, 76.88, 77.04, 76.64, 76.68),
    ("miniimagenet", 4000): (58.95, 59.29, 59.46, 59.14, 59.36),
    ("miniimagenet", 10000): (67.31, 66.63, 67.31, 67.46, 66.79),
}

TABLES = {
    1: PaperTable(1, "LaplaceNet with and without DRL / VDRL pretraining, full training", (
        ("laplacenet", "LaplaceNet"), ("laplacenet-mixup", "LaplaceNet + mixup"), ("drl", "DRL"),
        ("drl-mixup", "DRL + mixup"), ("vdrl", "VDRL")), _T1),
    2: PaperTable(2, "Limited compute (classifier trained for 100 epochs only)", (
        ("none", "No pretraining"), ("drl", "DRL pretraining")), _T2),
    3: PaperTable(3, "Pretraining options, limited compute", (
        ("none", "None"), ("none-mixup", "None + mixup"), ("drl", "DRL"),
        ("drl-tsearch", "DRL t-search"), ("ae", "Autoencoder")), _T3),
    4: PaperTable(4, "DRL vs autoencoder pretraining, full training, no mixup", (
        ("none", "None"), ("drl", "DRL"), ("ae", "Autoencoder")), _T4),
    5: PaperTable(5, "Mixup in pretraining and in supervised training, full training", (
        ("basic", "Basic (no mixup)"), ("basic-mixup", "Basic (mixup in sup. training)"),
        ("mixupdrl-mixup", "Mixup-DRL (mixup in both)"), ("vdrl", "VDRL (no mixup)"),
        ("vdrl-mixup", "VDRL (mixup)")), _T5),
}


def table(number: int) -> PaperTable:
    """The paper's Table ``number`` (1..5); KeyError for another number."""
    return TABLES[number]
