#!/usr/bin/env python
"""LaplaceNet semi-supervised training, optionally from a DRL-pretrained encoder (see laplacedrl.train_ssl).

    python train_ssl.py --dataset digits --labels 50
    python train_ssl.py --labels 4000 --init runs/drl_cifar10_.../ckpt.pt
"""
import sys

from laplacedrl.errors import main_guard
from laplacedrl.train_ssl import main

if __name__ == "__main__":
    sys.exit(main_guard(main))
