#!/usr/bin/env python
"""LaplaceNet semi-supervised training, optionally from a DRL-pretrained encoder.

    python train_ssl.py --dataset digits --labels 50
    python train_ssl.py --dataset cifar10 --labels 4000 --init runs/drl_cifar10_.../ckpt.pt

Every flag is a field of laplacedrl.config.SSLConfig; configs/ssl/<dataset>.yaml holds per-dataset
defaults and --config FILE.yaml further overrides. Re-running a command resumes its run dir.
"""
import sys

from laplacedrl import config as C
from laplacedrl.errors import main_guard


def main(argv=None):
    cfg = C.parse(C.SSLConfig, argv, prog="train_ssl.py", description=__doc__.split("\n")[1])
    from laplacedrl.ssl.laplacenet import train_ssl  # heavy imports after flag parsing
    return train_ssl(cfg)


if __name__ == "__main__":
    sys.exit(main_guard(main))
