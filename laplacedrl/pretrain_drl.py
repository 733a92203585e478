"""DRL / VDRL / Mixup-DRL / autoencoder pretraining of the classifier's encoder.

    python pretrain_drl.py --dataset digits
    python pretrain_drl.py --dataset cifar100 --objective vdrl --sample 64

(or ``python -m laplacedrl.pretrain_drl`` where the package is installed). Writes <run dir>/ckpt.pt
for `train_ssl.py --init`. Every flag is a field of laplacedrl.config.DRLConfig;
laplacedrl/configs/drl/<dataset>.yaml holds per-dataset defaults. Re-running a command resumes its
run dir; on a finished run, --sample N only draws samples.
"""
import sys

from laplacedrl import config as C
from laplacedrl.engine.lock import refuse_if_in_use
from laplacedrl.errors import main_guard


def main(argv=None):
    cfg = C.parse(C.DRLConfig, argv, prog="pretrain_drl.py", description=__doc__.split("\n")[0])
    if not cfg.print_config:
        refuse_if_in_use(cfg.out)  # at once, not after the imports and the data
    from laplacedrl.recipes.pretrain import pretrain  # heavy imports after flag parsing
    return pretrain(cfg)


if __name__ == "__main__":
    sys.exit(main_guard(main))
