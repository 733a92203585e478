"""One config system for both CLIs.

Precedence, lowest first::

    dataclass defaults  <-  configs/<kind>/<dataset>.yaml  <-  --init checkpoint  <-  --config FILE.yaml  <-  flags

``configs/`` is package data (``laplacedrl/configs/``, read with :mod:`importlib.resources`, so an
installed package finds it); every dataset has one YAML per CLI (``ssl``, ``drl``), or its defaults
in its entry of the dataset registry (:mod:`laplacedrl.registry`). For train_ssl.py,
an ``--init`` checkpoint decides the architecture (a different ``--arch`` is refused) and, unless
``--dataset`` is given, the dataset and its ``--data-dir``; the CLI hands in the function that reads
it (``init_values``), so that this module stays plain data and checks.

Every field of a config dataclass is one flag (``batch_size`` -> ``--batch-size``; a boolean
``mixup`` gets ``--mixup`` / ``--no-mixup``), shown in ``--help`` under its group (:data:`GROUPS`);
its metadata also says whether it is run-neutral (:data:`RUN_NEUTRAL`). YAML files use the field
names. Unknown keys, wrong types and values outside a field's choices raise
:class:`~laplacedrl.errors.UserError`, so a typo never passes silently. The resolved config is a
plain dict (``asdict``) that goes into ``config.yaml`` and every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import yaml

from laplacedrl import choices as CH
from laplacedrl import registry
from laplacedrl.errors import OneLineParser, UserError



def package_configs():
    """The YAML configs shipped with the package: ``laplacedrl/configs/{ssl,drl,tables}/``."""
    return resources.files("laplacedrl") / "configs"


# The groups of --help, in order: each field names its group.
GROUPS = {
    "data": "the dataset, its labeled split and augmentation",
    "model": "the network and its starting point",
    "schedule": "steps, epochs and the optimiser",
    "LaplaceNet": "the graph step and the semi-supervised loss",
    "DRL": "the diffusion objective and sampling",
    "speed": "where and how fast it runs (results unchanged unless said)",
    "run": "the run dir, seed, resuming and output",
}


def opt(default, help: str, choices=None, *, group: str, neutral: bool = False):
    """A config field with its help text, allowed values (a tuple, or a function returning one), its
    ``--help`` group (one of :data:`GROUPS`) and whether it is run-neutral: it does not change a
    run's result, so it may differ between a run and its resumption (and is not part of a run's
    identity)."""
    if group not in GROUPS:
        raise ValueError(f"config field group {group!r} is not one of {', '.join(GROUPS)}")
    return field(default=default,
                 metadata={"help": help, "choices": choices, "group": group, "neutral": neutral})


def choices_of(f: dataclasses.Field):
    """The allowed values of field ``f`` (None: any)."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


# ============ fields shared by both CLIs ============
@dataclass
class CommonConfig:
    dataset: str = opt("digits", "dataset; digits is bundled with scikit-learn and needs no download "
                                 "(train_ssl.py --init: the checkpoint's dataset unless given)", CH.datasets,
                       group="data")
    data_dir: str = opt("data", "folder holding the dataset (cifar-10-batches-py/, cifar-100-python/, "
                                "FashionMNIST/raw/ or the four idx files, train/ and test/ for "
                                "miniimagenet; for imagefolder your own labeled/<class>/, unlabeled/, "
                                "optional val/<class>/ and test/<class>/, or train/ and test/)",
                        group="data", neutral=True)
    skip_bad_images: bool = opt(False, "imagefolder: leave out the images the check before a run "
                                       "reports (unreadable, smaller than the folder's size, of a "
                                       "val/test class the training images lack) instead of stopping",
                                group="data")
    download: bool = opt(False, "download CIFAR / (Fashion-)MNIST into --data-dir if missing (needs internet)",
                         group="data", neutral=True)
    out: str = opt("", "run directory; default: runs/<derived from dataset, labels, seed, ...>",
                   group="run", neutral=True)
    seed: int = opt(0, "random seed (label split, initialisation, data order)", group="run")
    device: str = opt("auto", "auto (cuda when available), cpu, cuda or cuda:N", group="speed", neutral=True)
    arch: str = opt("wrn-28-2", "backbone: wrn-28-2, wrn-28-8, wrn-<depth>-<width>, resnet18; "
                                "pretrain_drl.py also takes auto (your own images' default): "
                                "wrn-28-2, the published encoder, for 10,000 or more pretraining "
                                "images of at most 32x32 pixels, else wrn-10-1", group="model")
    batch_size: int = opt(100, "images per step (train_ssl.py: 0 = fit the data, see --labeled-batch-size)",
                          group="schedule")
    labels: int = opt(4000, "labeled training images, drawn class-balanced with --seed: labels // C "
                            "per class, the remainder r one extra each for r classes picked with the "
                            "same seed; 0 = every labeled image there is (your own images' default)", group="data")
    label_file: str = opt("", "LaplaceNet split file ('<file> <class>' per line); overrides --labels",
                          group="data")
    train_subset: int = opt(0, "train on a fixed random subset of this many training images (0 = all)",
                            group="data")
    val_images: int = opt(0, "hold out this many training images (a fixed random draw, disjoint from "
                             "the training set) and evaluate on them instead of the test set: for "
                             "choosing hyper-parameters", group="data")
    cutout: float = opt(0.5, "Cutout after RandAugment: the square's side is U(0, cutout) x the image "
                             "side (LaplaceNet: 0.5; 0 = no Cutout)", group="data")
    num_workers: int = opt(-1, "data-loader worker processes per loader (0 = load in the main process; "
                               "-1 = the CPUs this process may use, at most 8)", group="speed", neutral=True)
    progress: bool = opt(True, "tqdm progress bars", group="run", neutral=True)
    amp: str = opt("off", "mixed precision: off (float32, as published), bf16, fp16, or auto (bf16 on "
                          "GPUs that support it)", CH.AMP, group="speed")
    channels_last: bool = opt(False, "channels-last memory format (faster convolutions on GPUs)",
                              group="speed", neutral=True)
    compile: bool = opt(False, "torch.compile the model (first steps are slow while it compiles)",
                        group="speed", neutral=True)
    resume: bool = opt(False, "require an existing last.pt in the run dir and continue from it "
                              "(rerunning a command resumes anyway when last.pt exists)",
                       group="run", neutral=True)
    fresh: bool = opt(False, "ignore an existing run dir's checkpoint and start over", group="run", neutral=True)
    print_config: bool = opt(False, "print the resolved config (and, for train_ssl.py, the schedule) "
                                    "and exit without training", group="run", neutral=True)
    config: str = opt("", "YAML file of overrides (field names as keys); flags still win",
                      group="run", neutral=True)


# ============ train_ssl.py ============
@dataclass
class SSLConfig(CommonConfig):
    init: str = opt("", "ckpt.pt of pretrain_drl.py: start from its encoder (time-conditioned, "
                        "learnable t)", group="model")
    t_init: float = opt(0.5, "initial diffusion time t of an --init encoder, in (0, 1)", group="model")
    freeze_t: bool = opt(False, "keep t fixed at --t-init instead of learning it", group="model")
    t_weight_decay: bool = opt(True, "weight decay on t's logit as published (it pulls t to 0.5); "
                                     "--no-t-weight-decay exempts it", group="schedule")
    t_search: bool = opt(False, "Table 3's t-search: one supervised phase from the --init encoder "
                                "per t in 0.01, 0.1, ..., 0.9, 0.99; the phase with the lowest "
                                "training loss goes on", group="model")
    supervised_only: bool = opt(False, "skip the graph step: train on the labeled images alone",
                                group="LaplaceNet")
    sup_rounds: int = opt(10, "supervised initialisation rounds (LaplaceNet: 10)", group="schedule")
    sup_passes: int = opt(10, "passes over the labeled set per round (LaplaceNet: 10; 10x10 = the "
                              "DRL paper's 100 supervised epochs)", group="schedule")
    epochs: int = opt(0, "semi-supervised epochs after the supervised rounds; 0 = as many as "
                         "--num-steps allows (LaplaceNet's formula)", group="schedule")
    num_steps: int = opt(250000, "step budget of the whole run when --epochs is 0: epochs = "
                                 "floor((num_steps - supervised steps) / steps per semi-supervised epoch)",
                         group="schedule")
    max_epochs: int = opt(0, "stop after this many epochs in all (supervised rounds included) while "
                             "the learning rate follows the full schedule (Tables 2-3 'limited "
                             "compute': 100); 0 = run the whole schedule", group="schedule")
    labeled_batch_size: int = opt(50, "labeled images in each composite batch; with --batch-size 0 "
                                      "or this 0 both fit the data: min(50, labeled) labeled + min(50, "
                                      "unlabeled) unlabeled per step", group="schedule")
    lr: float = opt(0.03, "SGD learning rate (cosine rampdown over all epochs + 10)", group="schedule")
    momentum: float = opt(0.9, "SGD momentum", group="schedule")
    nesterov: bool = opt(True, "Nesterov momentum", group="schedule")
    weight_decay: float = opt(5e-4, "weight decay", group="schedule")
    aug_num: int = opt(3, "augmented copies of each image per step (loss averaged over them)", group="LaplaceNet")
    fused_copies: bool = opt(False, "forward the --aug-num copies of a batch as one pass (faster on "
                                    "GPUs); published: one forward pass per copy, so BatchNorm sees "
                                    "batches of --batch-size", group="speed")
    mixup: bool = opt(False, "mixup in the supervised rounds (LaplaceNet's --mixup)", group="LaplaceNet")
    ssl_mixup: bool = opt(True, "mixup in the semi-supervised epochs (published: always; "
                                "--no-ssl-mixup for ablations)", group="LaplaceNet")
    mixup_alpha: float = opt(1.0, "Beta(alpha, alpha) of mixup, supervised and semi-supervised "
                                  "(published code: 1.0 for every dataset; LaplaceNet's README: 0.5 "
                                  "for CIFAR-100 and Mini-ImageNet)", group="LaplaceNet")
    body_lr_mult: float = opt(1.0, "hand-off: the body's learning rate (every parameter but the head "
                                   "and t) is --lr times this (published: 1)", group="model")
    bn_reestimate: bool = opt(False, "hand-off: after every epoch, recompute the BatchNorm statistics "
                                     "on the training images (eval transform), so the graph step and "
                                     "the evaluation see statistics of the data (published: off)",
                              group="model")
    norm_reset: bool = opt(False, "hand-off: scale the body's conv weights to a fresh initialisation's "
                                  "norms, BatchNorm statistics along (same eval-mode function, larger "
                                  "relative gradients; WRN only; published: off)", group="model")
    shrink: float = opt(1.0, "hand-off: shrink and perturb, w <- shrink * w + perturb * w_fresh for the "
                             "body's conv and linear weights (published: 1, no shrink)", group="model")
    perturb: float = opt(0.0, "hand-off: see --shrink (published: 0)", group="model")
    use_weights: bool = opt(False, "weight pseudo-labeled losses by 1 - H/log C (published: off)",
                            group="LaplaceNet")
    knn: int = opt(50, "neighbours per point in the graph (0 = fit the data: min(50, images - 1))",
                   group="LaplaceNet")
    alpha: float = opt(0.99, "propagation alpha in (I - alpha Wn) Z = Y", group="LaplaceNet")
    cg_max_iter: int = opt(30, "conjugate-gradient iterations at most", group="LaplaceNet")
    cg_tol: float = opt(1e-3, "conjugate-gradient relative tolerance", group="LaplaceNet")
    align_steps: int = opt(100, "distribution-alignment rounds", group="LaplaceNet")
    align_clip: float = opt(0.01, "alignment factors clipped to [1 - clip, 1 + clip]", group="LaplaceNet")
    knn_backend: str = opt("auto", "kNN search: auto (faiss when it can serve the device), faiss or "
                                   "torch", CH.KNN_BACKENDS, group="speed")
    ra_weak: int = opt(1, "RandAugment ops of the weak (labeled) augmentation", group="data")
    ra_strong: int = opt(2, "RandAugment ops of the strong (pseudo-labeled) augmentation", group="data")
    eval_batch_size: int = opt(100, "batch size of feature extraction and evaluation (LaplaceNet: the "
                                    "batch size; larger is slower per image on CPUs)", group="speed", neutral=True)
    eval_every: int = opt(1, "evaluate on the test set every this many epochs (and after the last); "
                             "LaplaceNet: 1", group="run", neutral=True)
    snapshot_epochs: typing.Tuple[int, ...] = opt((), "also keep the classifier after these epochs as "
                                                      "snapshots/epoch_<k>.pt (0: before training; e.g. "
                                                      "0,1,5,10 to probe what the supervised rounds do "
                                                      "to a pretrained code)", group="run", neutral=True)
    augment_on: str = opt("auto", "where augmented copies are made: cpu (PIL in the loader workers, as "
                                  "published), device (batched tensor ops on the training device, "
                                  "compared with the PIL path on the CPU device only) or auto (= cpu "
                                  "until the device path has run on a GPU)", CH.AUGMENT_ON,
                          group="speed", neutral=True)


# ============ pretrain_drl.py ============
@dataclass
class DRLConfig(CommonConfig):
    objective: str = opt("drl", "drl (L1 code), vdrl (variational code), mixup-drl, ae (autoencoder)",
                         CH.OBJECTIVES, group="DRL")
    pretrain_data: str = opt("labeled", "labeled: the --labels / --label-file images of the split "
                                        "(published: 4000 labels); all: every training image",
                             CH.PRETRAIN_DATA, group="data")
    augment: str = opt("weak", "pretraining augmentation: weak (flip, crop, RandAugment 1 op + Cutout, "
                               "as published) or flip (random flip only)", CH.PRETRAIN_AUGMENT, group="data")
    sde: str = opt("ve", "ve (variance exploding) or vp (variance preserving)", CH.SDES, group="DRL")
    sigma_min: float = opt(0.01, "VE sigma_min", group="DRL")
    sigma_max: float = opt(50.0, "VE sigma_max", group="DRL")
    beta_min: float = opt(0.1, "VP beta_min", group="DRL")
    beta_max: float = opt(20.0, "VP beta_max", group="DRL")
    t_sampling: str = opt("uniform", "uniform, high-noise (sigma uniform) or fixed:<t>", group="DRL")
    iters: int = opt(70000, "training iterations (paper's SSL encoders: 70k); 0 = from --passes",
                     group="schedule")
    passes: float = opt(0.0, "with --iters 0: iterations = ceil(passes x pretraining images / "
                             "--batch-size), a budget in passes over the pretraining images (your "
                             "own images: 40)", group="schedule", neutral=True)
    lr: float = opt(2e-4, "Adam learning rate", group="schedule")
    warmup: int = opt(5000, "linear lr warm-up steps: lr * min(step / warmup, 1); a default "
                            "warm-up longer than half the run is scaled to 5% of it, a given one "
                            "refused (one line says which)", group="schedule")
    warmup_fraction: float = opt(0.0, "when > 0 and --warmup is not given: the warm-up is this "
                                      "fraction of the iterations (your own images: 0.05)", group="schedule",
                                 neutral=True)
    grad_clip: float = opt(1.0, "gradient-norm clip", group="schedule")
    ema: float = opt(0.999, "EMA decay of the weights used for sampling", group="DRL")
    export: str = opt("raw", "encoder weights in ckpt.pt: raw (the last training weights, as "
                             "published) or ema", CH.EXPORT_WEIGHTS, group="DRL")
    l1_weight: float = opt(1e-5, "DRL / mixup-DRL / ae: weight of the L1 penalty on the code", group="DRL")
    kl_weight: float = opt(1e-5, "VDRL: weight of KL(q(z|x) || N(0, I)) (published command: 1e-5)", group="DRL")
    mixup_alpha: float = opt(1.0, "mixup-drl: Beta(alpha, alpha) of the per-image mixing weight", group="DRL")
    code_dim: int = opt(0, "VDRL code size (0 = the encoder's feature size)", group="DRL")
    t_bias: str = opt("before_bn", "where the encoder adds its time embedding: before_bn (published; a "
                                   "t shared by a batch is then cancelled by BatchNorm) or after_bn",
                      CH.T_BIAS, group="model")
    nf: int = opt(16, "score net channels at full resolution (NCSN++ 'small': 16)", group="model")
    ch_mult: typing.Tuple[int, ...] = opt((1, 2, 2, 2), "score net channel multiplier per resolution",
                                          group="model")
    num_res_blocks: int = opt(2, "score net residual blocks per resolution", group="model")
    attn_resolutions: typing.Tuple[int, ...] = opt((16,), "resolutions with self-attention", group="model")
    dropout: float = opt(0.1, "dropout in the score net's residual blocks", group="model")
    log_every: int = opt(100, "iterations between TensorBoard scalars", group="run", neutral=True)
    ckpt_every: int = opt(1000, "iterations between checkpoints (also written at the end)",
                          group="run", neutral=True)
    snapshot_every: int = opt(0, "also keep a ckpt.pt-format snapshot every this many iterations in "
                                 "snapshots/ (e.g. to probe the code over training); 0 = none",
                              group="run", neutral=True)
    sample: int = opt(0, "after training, draw this many conditional samples into samples.png",
                      group="DRL", neutral=True)
    sampler: str = opt("pc", "pc (predictor-corrector) or em (Euler-Maruyama)", CH.SAMPLERS,
                       group="DRL", neutral=True)
    sample_steps: int = opt(500, "reverse-SDE steps of the sampler", group="DRL", neutral=True)


# ============ parsing ============
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(cls, f: dataclasses.Field, value, source: str):
    """Check/convert one value for field ``f`` of ``cls``; raise UserError naming ``source``."""
    typ = _types(cls)[f.name]
    where = f"{source}: {f.name}"
    if typ is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            out = value.lower() in ("true", "yes", "1")
        else:
            raise UserError(f"{where} must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool):
            raise UserError(f"{where} must be an integer, got {value!r}")
        try:
            out = int(value)
            if isinstance(value, float) and value != out:
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{where} must be an integer, got {value!r}") from None
    elif typ is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, got {value!r}") from None
    elif typ is str:
        out = "" if value is None else str(value)
    else:  # tuple of ints
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            out = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a list of integers, got {value!r}") from None
    choices = choices_of(f)
    if choices and out not in choices:
        raise UserError(f"{where}: {out!r} is not one of {', '.join(map(str, choices))}")
    return out


@functools.lru_cache(maxsize=None)
def _types(cls) -> dict:
    """Field name -> type (the annotations are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def build_parser(cls, prog: str, description: str, defaults: dict | None = None,
                 dataset: str = "") -> argparse.ArgumentParser:
    """argparse parser with one flag per field; defaults suppressed so we see what was given.

    ``defaults`` (field -> value) are the values the help text shows: the built-in ones with the
    per-dataset YAML of ``dataset`` applied, i.e. what would run.
    """
    defaults = defaults or {f.name: f.default for f in dataclasses.fields(cls)}
    kind = kind_of(cls)
    epilog = (f"Defaults shown are for --dataset {dataset or 'digits'}: the built-in values with "
              f"configs/{kind}/{dataset or 'digits'}.yaml applied (pass --dataset NAME --help for "
              f"another dataset). Precedence: built-in <- configs/{kind}/<dataset>.yaml <- --config "
              f"FILE.yaml <- flags; the resolved config is written to the run dir's config.yaml.")
    if cls is SSLConfig:
        epilog += (" With --init, the architecture follows the checkpoint, and so do the dataset and "
                   "--data-dir unless --dataset is given.")
    p = OneLineParser(prog=prog, description=description, epilog=epilog, argument_default=argparse.SUPPRESS)
    used = {f.metadata["group"] for f in dataclasses.fields(cls)}      # train_ssl.py has no DRL flags
    groups = {name: p.add_argument_group(name, about) for name, about in GROUPS.items() if name in used}
    for f in dataclasses.fields(cls):
        add_flag(groups[f.metadata["group"]], cls, f, defaults.get(f.name, f.default))
    return p


def add_flag(parser, cls, f: dataclasses.Field, default, show: bool = True):
    """Add field ``f``'s flag to ``parser`` (or an argument group), its help naming ``default``
    (``show``) -- the parsed value is a string, checked and converted by :func:`resolve`."""
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    hlp = f.metadata["help"] + (f" (default: {shown})" if show and default not in ("", ()) else "")
    hlp = hlp.replace("%", "%%")
    if _types(cls)[f.name] is bool:
        parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=hlp)
    else:
        parser.add_argument(_flag(f.name), type=str, metavar=f.name.upper(), choices=choices_of(f), help=hlp)


def shared_flag(parser, name: str, default=dataclasses.MISSING, shown: str = "") -> None:
    """Add the flag of :class:`CommonConfig` field ``name`` to a secondary tool's ``parser`` (probe,
    evaluate, sample, reproduce, demo_images) with the help, type and default of train_ssl.py's and
    pretrain_drl.py's flag, so that they cannot drift apart. ``default``: where the tool starts from
    something else (``data_dir`` "" = the checkpoint's), which ``shown`` then says."""
    f = next(f for f in dataclasses.fields(CommonConfig) if f.name == name)
    default = f.default if default is dataclasses.MISSING else default
    hlp = f"{f.metadata['help']} (default: {shown or default})".replace("%", "%%")
    # the default is the parser's, not the flag's, so that a help formatter that shows defaults
    # (ArgumentDefaultsHelpFormatter) does not print it a second time
    parser.set_defaults(**{name: default})
    parser.add_argument(_flag(name), type=_types(CommonConfig)[name], choices=choices_of(f), help=hlp,
                        default=argparse.SUPPRESS)


def _read_yaml(path, cls) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of field: value")
    return _known_keys(data, cls, f"config file {path}")


def _known_keys(data: dict, cls, source: str) -> dict:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return data


def _dataset_layer(cls, dataset: str, config_dir):
    """``(source, values)`` of a dataset's defaults: ``configs/<kind>/<dataset>.yaml``, or the
    ``defaults`` of its registry entry (a dataset registered from outside the package)."""
    kind = kind_of(cls)
    defaults = registry.get(dataset).defaults
    if defaults is not None:
        source = f"the registered defaults of dataset {dataset}"
        return source, _known_keys(dict(defaults.get(kind, {})), cls, source)
    ds_file = (config_dir or package_configs()) / kind / f"{dataset}.yaml"
    if not ds_file.is_file():
        raise UserError(f"the config {ds_file} of dataset {dataset} is missing: the laplacedrl "
                        f"installation is incomplete (reinstall it)")
    return str(ds_file), _read_yaml(ds_file, cls)


def kind_of(cls) -> str:
    return {SSLConfig: "ssl", DRLConfig: "drl"}[cls]


def _init_layer(init: str, given: dict, values: dict) -> dict:
    """The values an --init checkpoint sets: its architecture always (a different one given is an
    error), its data dir when its dataset is used and no --data-dir is given."""
    arch = given.get("arch")
    if arch is not None and str(arch).strip().lower() != values["arch"]:
        raise UserError(f"--arch {arch} contradicts --init {init}, whose encoder is a {values['arch']}; "
                        f"drop --arch (--init sets the architecture)")
    layer = {"arch": values["arch"]}
    if "data_dir" not in given and "dataset" not in given and values.get("data_dir"):
        layer["data_dir"] = values["data_dir"]
    return layer


def _layers(cls, cli: dict, config_dir, init_values: Optional[Callable] = None):
    """The (source, values) layers above the built-in defaults, and where the dataset came from."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    user_file = cli.get("config") or ""
    user = _read_yaml(Path(user_file), cls) if user_file else {}
    init = cli.get("init", user.get("init", "")) if cls is SSLConfig else ""
    from_init = init_values(init) if init and init_values else None
    if "dataset" in cli:
        dataset, source = cli["dataset"], "--dataset"
    elif "dataset" in user:
        dataset, source = user["dataset"], f"--config {user_file}"
    elif from_init:
        dataset, source = from_init["dataset"], f"the --init checkpoint {init}"
    else:
        dataset, source = fields["dataset"].default, "the default; pass --dataset to choose"
    dataset = _coerce(cls, fields["dataset"], dataset, "--dataset")
    layers = [_dataset_layer(cls, dataset, config_dir)]
    if from_init:
        layers.append((f"the --init checkpoint {init}", _init_layer(init, {**user, **cli}, from_init)))
    if user_file:
        layers.append((user_file, user))
    layers.append(("command line", {**cli, "dataset": dataset}))
    return layers, source


def _merge(cls, layers) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for source, layer in layers:
        for k, v in layer.items():
            values[k] = _coerce(cls, fields[k], v, source)
    return values


def resolve(cls, cli: dict, config_dir=None, init_values: Optional[Callable] = None):
    """Merge defaults <- per-dataset YAML <- --init <- --config YAML <- ``cli`` (a dict of given flags).

    ``config_dir``: where the per-dataset YAMLs are (default: the package's). ``init_values(path)``
    reads an ``--init`` checkpoint -> ``{"dataset", "data_dir", "arch"}`` (train_ssl.py passes
    :func:`laplacedrl.engine.checkpoint.init_values`; without it ``--init`` sets nothing here).
    ``cfg.dataset_source`` says where the dataset came from.
    """
    layers, source = _layers(cls, cli, config_dir, init_values)
    cfg = cls(**_merge(cls, layers))
    cfg.dataset_source = source        # not a field: not in config.yaml, not part of the run's identity
    cfg.given = frozenset(k for _, layer in layers[1:] for k in layer)   # set by the user, not a default
    validate(cfg)
    return cfg


def parse(cls, argv=None, prog=None, description="", init_values: Optional[Callable] = None):
    """Parse a CLI into a resolved config dataclass; ``--help`` shows the chosen dataset's defaults.
    ``init_values``: see :func:`resolve`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = OneLineParser(add_help=False)
    pre.add_argument("--dataset", default="")
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    shown = None
    if "-h" in argv or "--help" in argv:
        try:
            hint = {k: v for k, v in vars(known).items() if v}
            layers, _ = _layers(cls, hint, None)
            shown = {f.name: f.default for f in dataclasses.fields(cls)} | _merge(cls, layers[:-1])
        except UserError:
            shown = None                    # a bad --dataset or --config: show the built-in defaults
    parser = build_parser(cls, prog, description, shown, known.dataset)
    cfg = resolve(cls, vars(parser.parse_args(argv)), init_values=init_values)
    cfg.command = [prog or Path(sys.argv[0]).name, *argv]     # what run.json records
    return cfg


def validate(cfg) -> None:
    """Cross-field checks that a flag's type alone cannot express."""
    def need(cond, msg):
        if not cond:
            raise UserError(msg)
    need(cfg.batch_size > 0 or (isinstance(cfg, SSLConfig) and cfg.batch_size == 0),
         f"--batch-size must be positive, got {cfg.batch_size}")
    need(cfg.num_workers >= -1, f"--num-workers must be >= 0 (or -1 = auto), got {cfg.num_workers}")
    need(not (cfg.resume and cfg.fresh), "--resume and --fresh contradict each other")
    need(cfg.labels >= 0, f"--labels must be >= 0 (0: every labeled image), got {cfg.labels}")
    need(cfg.train_subset >= 0 and cfg.val_images >= 0, "--train-subset and --val-images must be >= 0")
    need(0.0 <= cfg.cutout <= 1.0, f"--cutout must be in [0, 1], got {cfg.cutout}")
    try:
        if not (isinstance(cfg, DRLConfig) and cfg.arch == "auto"):
            CH.parse_arch(cfg.arch)
    except ValueError as e:
        raise UserError(f"--arch: {e}" + ("; auto is pretrain_drl.py's" if cfg.arch == "auto" else "")) from None
    if isinstance(cfg, SSLConfig):
        need(0 < cfg.labeled_batch_size < cfg.batch_size or cfg.supervised_only or 0 in (
            cfg.labeled_batch_size, cfg.batch_size), f"--labeled-batch-size must be in (0, --batch-size="
             f"{cfg.batch_size}), got {cfg.labeled_batch_size}")
        need(0.0 < cfg.t_init < 1.0, f"--t-init must be in (0, 1), got {cfg.t_init}")
        need(cfg.aug_num >= 1, f"--aug-num must be >= 1, got {cfg.aug_num}")
        need(cfg.epochs >= 0 and cfg.sup_rounds >= 0 and cfg.sup_passes >= 1,
             "--epochs and --sup-rounds must be >= 0 and --sup-passes >= 1")
        need(cfg.epochs > 0 or cfg.num_steps > 0, "--epochs 0 needs a step budget (--num-steps > 0)")
        need(cfg.num_steps >= 0 and cfg.max_epochs >= 0, "--num-steps and --max-epochs must be >= 0")
        need(cfg.knn >= 0, f"--knn must be >= 1 (or 0: fit the data), got {cfg.knn}")
        need(cfg.eval_batch_size >= 1 and cfg.eval_every >= 1,
             f"--eval-batch-size and --eval-every must be >= 1, got {cfg.eval_batch_size}, {cfg.eval_every}")
        need(0.0 < cfg.alpha < 1.0, f"--alpha must be in (0, 1), got {cfg.alpha}")
        need(cfg.mixup_alpha > 0, f"--mixup-alpha must be positive, got {cfg.mixup_alpha}")
        need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
        need(not (cfg.t_search and not cfg.init), "--t-search needs --init (a DRL checkpoint)")
    else:
        need(cfg.iters >= 1 or (cfg.iters == 0 and cfg.passes > 0),
             f"--iters must be >= 1 (or 0 with --passes > 0), got {cfg.iters}")
        need(cfg.passes >= 0 and cfg.warmup >= 0, "--passes and --warmup must be >= 0")
        need(0.0 <= cfg.warmup_fraction <= 0.5, f"--warmup-fraction must be in [0, 0.5], got {cfg.warmup_fraction}")
        need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
        need(cfg.nf >= 1 and cfg.num_res_blocks >= 1 and len(cfg.ch_mult) >= 1,
             "--nf and --num-res-blocks must be >= 1 and --ch-mult non-empty")
        need(0.0 <= cfg.dropout < 1.0, f"--dropout must be in [0, 1), got {cfg.dropout}")
        try:
            CH.parse_t_sampling(cfg.t_sampling)
        except ValueError as e:
            raise UserError(f"--t-sampling: {e}") from None


def replace(cfg, **changes):
    """``dataclasses.replace`` that keeps what the CLI attached (``dataset_source``, ``command``)."""
    new = dataclasses.replace(cfg, **changes)
    names = {f.name for f in dataclasses.fields(cfg)}
    new.__dict__.update({k: v for k, v in vars(cfg).items() if k not in names})
    return new


def to_dict(cfg) -> dict:
    """Plain, YAML-safe dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg, **extra) -> str:
    """The config as ``config.yaml`` records it (keys sorted), with ``extra`` keys added."""
    return yaml.safe_dump({**to_dict(cfg), **extra}, sort_keys=True)


def from_dict(cls, d: dict):
    """Rebuild a config from ``to_dict`` output (e.g. a checkpoint's record)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: _coerce(cls, fields[k], v, "record") for k, v in d.items() if k in fields})


# Fields that do not change a run's result (``neutral=True``): they may differ between a run and its
# resumption.
RUN_NEUTRAL = frozenset(f.name for cls in (SSLConfig, DRLConfig) for f in dataclasses.fields(cls)
                        if f.metadata["neutral"])


def config_diff(old: dict, new: dict) -> list:
    """Keys whose values differ between two config dicts, ignoring run-neutral ones."""
    keys = (set(old) | set(new)) - RUN_NEUTRAL
    return sorted(k for k in keys if old.get(k) != new.get(k))
