"""Names the CLIs, the configs and the library accept, defined once (no torch import here, so that
``--help`` and config checks stay fast). The dataset names are the registry's
(:mod:`laplacedrl.registry`): :func:`datasets` reads them when asked, so a dataset registered
later is accepted too."""
import re

from laplacedrl import registry

OBJECTIVES = ("drl", "vdrl", "mixup-drl", "ae")
SDES = ("ve", "vp")
KNN_BACKENDS = ("auto", "faiss", "torch")
AMP = ("auto", "bf16", "fp16", "off")
AUGMENT_ON = ("auto", "cpu", "device")
SAMPLERS = ("pc", "em")
PRETRAIN_DATA = ("labeled", "all")
PRETRAIN_AUGMENT = ("weak", "flip")
EXPORT_WEIGHTS = ("raw", "ema")
T_BIAS = ("before_bn", "after_bn")

ARCH_NAMES = ("wrn-28-2", "wrn-28-8", "resnet18")
_WRN = re.compile(r"wrn-(\d+)-(\d+)")
_ARCH_HELP = f"valid: {', '.join(ARCH_NAMES)}, or wrn-<depth>-<width> with (depth-4) % 6 == 0"
T_SAMPLING_HELP = "uniform | high-noise | fixed:<t> with 0 < t <= 1"


def datasets() -> tuple:
    """The dataset names of the registry, in its order."""
    return registry.names()


def parse_arch(arch: str):
    """``(depth, width)`` of a WRN name, None for resnet18; ValueError naming the valid names otherwise."""
    name = str(arch).strip().lower()
    if name == "resnet18":
        return None
    match = _WRN.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown architecture {arch!r}; {_ARCH_HELP}")
    depth, width = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"bad WRN depth in {arch!r}; {_ARCH_HELP} (depth >= 10)")
    return depth, width


def parse_t_sampling(mode: str):
    """Validate a ``--t-sampling`` value: ``("uniform", None)``, ``("high-noise", None)`` or ``("fixed", t)``."""
    if mode in ("uniform", "high-noise"):
        return mode, None
    if mode.startswith("fixed:"):
        try:
            t = float(mode[len("fixed:"):])
        except ValueError:
            raise ValueError(f"t-sampling {mode!r}: cannot parse the time after 'fixed:'") from None
        if not 0.0 < t <= 1.0:
            raise ValueError(f"t-sampling {mode!r}: the fixed time must satisfy 0 < t <= 1")
        return "fixed", t
    raise ValueError(f"unknown t-sampling {mode!r}; expected {T_SAMPLING_HELP}")
