"""Frozen-encoder probes over the diffusion time t (paper Sec. 3.1, App. E, H: Fig. 4, 8, 12).

    python -m laplacedrl.probe --ckpt runs/drl_digits_.../ckpt.pt [--ae-ckpt ae/ckpt.pt] [--out DIR]

What is measured, and how, is the recipe's: :mod:`laplacedrl.recipes.probe`. Writes ``probe.csv``
(one row per encoder and t), ``probe.png`` and TensorBoard scalars into ``--out``.
"""
from __future__ import annotations

import argparse
import sys

from laplacedrl.config import shared_flag
from laplacedrl.errors import OneLineParser, main_guard


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m laplacedrl.probe", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="", help="ckpt.pt of pretrain_drl.py")
    p.add_argument("--ae-ckpt", default="", help="ckpt.pt of pretrain_drl.py --objective ae (baseline)")
    p.add_argument("--also", action="append", default=[], metavar="CKPT",
                   help="another ckpt.pt to probe side by side (e.g. a VDRL one); repeatable")
    p.add_argument("--classifier", action="append", default=[], metavar="[NAME=]PATH",
                   help="a train_ssl.py run's last.pt or snapshots/epoch_<k>.pt: its features at its "
                        "own t; repeatable")
    p.add_argument("--random", action=argparse.BooleanOptionalAction, default=True,
                   help="add a randomly initialised encoder of the same architecture (baseline)")
    p.add_argument("--out", default="", help="output folder (default: <ckpt or classifier dir>/probe)")
    p.add_argument("--dataset", default="", help="default: the checkpoint's dataset")
    shared_flag(p, "data_dir", "", shown="the checkpoint's --data-dir")
    p.add_argument("--svm-labels", default="", help="comma-separated labeled-code counts for the SVC "
                                                    "(default 100,1000; digits 20,100)")
    p.add_argument("--mlp-hidden", type=int, default=256, help="hidden units of the MLP")
    p.add_argument("--mlp-epochs", type=int, default=50, help="training epochs of the MLP (0: no MLP probe)")
    p.add_argument("--max-train", type=int, default=0, help="if > 0, use this many training images "
                                                            "(a seeded random subset)")
    p.add_argument("--val-images", type=int, default=0, help="measure on this many held-out training "
                   "images instead of the test set (train_ssl.py --val-images' draw; 0: the test set)")
    for name in ("batch_size", "num_workers", "device", "seed"):  # seed: random encoder, MLP, SVC labels
        shared_flag(p, name)
    return p


def main(argv=None) -> list:
    opts = build_parser().parse_args(argv)
    from laplacedrl.recipes.probe import probe  # heavy imports after flag parsing
    return probe(opts)


if __name__ == "__main__":
    sys.exit(main_guard(main))
