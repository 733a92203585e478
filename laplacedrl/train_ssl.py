"""LaplaceNet semi-supervised training, optionally from a DRL-pretrained encoder.

    python train_ssl.py --dataset digits --labels 50
    python train_ssl.py --dataset cifar10 --labels 4000 --init runs/drl_cifar10_.../ckpt.pt

(or ``python -m laplacedrl.train_ssl`` where the package is installed). Every flag is a field of
laplacedrl.config.SSLConfig; laplacedrl/configs/ssl/<dataset>.yaml holds per-dataset defaults and
--config FILE.yaml further overrides. Re-running a command resumes its run dir.
"""
import sys

from laplacedrl import config as C
from laplacedrl.engine.checkpoint import init_values
from laplacedrl.engine.lock import refuse_if_in_use
from laplacedrl.errors import main_guard


def main(argv=None):
    cfg = C.parse(C.SSLConfig, argv, prog="train_ssl.py", description=__doc__.split("\n")[0],
                  init_values=init_values)
    if not cfg.print_config:
        refuse_if_in_use(cfg.out)  # at once, not after the imports and the data
    from laplacedrl.recipes.ssl import train_ssl  # heavy imports after flag parsing
    return train_ssl(cfg)


if __name__ == "__main__":
    sys.exit(main_guard(main))
