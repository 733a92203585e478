#!/usr/bin/env python
"""DRL pretraining of the classifier's encoder (see laplacedrl.pretrain_drl).

    python pretrain_drl.py --dataset digits
    python pretrain_drl.py --dataset cifar100 --objective vdrl --sample 64
"""
import sys

from laplacedrl.errors import main_guard
from laplacedrl.pretrain_drl import main

if __name__ == "__main__":
    sys.exit(main_guard(main))
