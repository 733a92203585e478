#!/usr/bin/env python
"""Training throughput (images/s): whole semi-supervised epochs and whole DRL pretraining steps
through the real loaders, each next to the bare model step of the same shape; one JSON line each.

Runs the project's own code (``ssl.loaders.Loaders`` + ``ssl.epoch.train_epoch``, ``DRLModels``) on
random images, so what it measures is what the CLIs run::

    python benchmarks/throughput.py --device cpu --configs cpu-aug,fp32 --labels 40   # few labels
    python benchmarks/throughput.py --device cuda                                       # the grid

``--kinds drl`` (``--recipe fmnist|digits|cifar10``): ``real`` = whole pretraining steps
(``laplacedrl.drl.step.pretrain_step``: times, warm-up rate, objective, clipping, Adam, EMA) on
batches from the recipe's real loader over random images of its shape, after ``--warmup`` steps;
``bare`` = forward + backward + Adam on one fixed batch (per-sample t); ``ratio`` = real / bare::

    python benchmarks/throughput.py --device cpu --kinds drl --recipe fmnist --configs fp32 --steps 40

``epoch`` lines: a semi-supervised epoch (labeled stream + pseudo-labeled images, --aug-num copies,
loader workers as --workers) timed end to end, after one warm-up epoch (worker start-up, cudnn
autotuning, compilation); ``bare`` lines: forward + backward + SGD step of the same model on one
fixed device batch of the same shape, no loader, no augmentation; ``ratio`` = epoch / bare.
"images/s" counts every augmented copy the network sees. A configuration is a comma list of
``cpu-aug`` (PIL augmentation in the loader workers, the published path) or ``gpu-aug`` (batched
tensor augmentation on the device), ``fp32`` / ``bf16`` / ``fp16``, ``cl`` (channels-last),
``compile`` (torch.compile), ``fused`` (``--fused-copies``: all augmented copies in one forward pass).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from laplacedrl import config as C  # noqa: E402
from laplacedrl.data.datasets import CIFAR10_MEAN, CIFAR10_STD, ArrayImageSet, DatasetSpec, index_names  # noqa: E402
from laplacedrl.drl.models import DRLModels, make_sde  # noqa: E402
from laplacedrl.engine.distributed import DistInfo  # noqa: E402
from laplacedrl.engine.run import Precision, prepare_model  # noqa: E402
from laplacedrl.models import build_model  # noqa: E402
from laplacedrl.ssl.epoch import copies_loss, train_epoch  # noqa: E402
from laplacedrl.ssl.loaders import Loaders, SSLData, make_augmentation  # noqa: E402
from laplacedrl.ssl.model import make_optimizer  # noqa: E402
from laplacedrl.ssl.schedule import make_schedule  # noqa: E402

DEFAULT_CONFIGS = ["cpu-aug,fp32", "gpu-aug,fp32", "gpu-aug,bf16,cl", "gpu-aug,bf16,cl,compile"]


def synthetic_data(n: int, size: int, channels: int, classes: int, labels: int, seed: int = 0):
    """SSLData of n random images, ``labels`` of them labeled (the first ones)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n + 100, size, size, channels), dtype=np.uint8)
    targets = rng.integers(0, classes, n + 100)
    names = [str(c) for c in range(classes)]
    train = ArrayImageSet(images[:n], targets[:n], names, index_names(targets[:n], names))
    test = ArrayImageSet(images[n:], targets[n:], names, index_names(targets[n:], names))
    spec = DatasetSpec("synthetic", classes, channels, size, CIFAR10_MEAN[:channels], CIFAR10_STD[:channels],
                       size // 8, True)
    lab = np.arange(labels)
    return SSLData(train, test, spec, lab, np.arange(labels, n), torch.as_tensor(train.targets))


def parse_config(text: str) -> dict:
    parts = set(text.split(","))
    amp = next((p for p in ("bf16", "fp16") if p in parts), "off")
    return {"augment_on": "device" if "gpu-aug" in parts else "cpu", "amp": amp,
            "channels_last": "cl" in parts, "compile": "compile" in parts, "fused_copies": "fused" in parts}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ssl_throughput(args, opts, device) -> list:
    """[epoch line, bare line] for one configuration."""
    data = synthetic_data(args.images, args.image_size, args.channels, args.classes, args.labels)
    cfg = C.resolve(C.SSLConfig, {"dataset": "cifar10", "arch": args.arch, "aug_num": str(args.aug_num),
                                  "batch_size": str(args.batch_size), "num_workers": str(args.workers),
                                  "labeled_batch_size": str(args.labeled_batch_size), "epochs": "1",
                                  "sup_rounds": "0", **{k: str(v) for k, v in opts.items()}})
    sched = make_schedule(cfg, len(data.lab_idx), len(data.unl_idx))
    weak, strong, copies, augment = make_augmentation(cfg, data.spec, device)
    model = prepare_model(build_model(cfg.arch, data.spec.num_classes, data.spec.channels,
                                         data.spec.image_size), cfg, device)
    fwd = torch.compile(model) if cfg.compile else model
    opt, prec = make_optimizer(cfg, model), Precision(cfg.amp, device)
    loaders = Loaders(cfg, data, sched, DistInfo(), device, weak, strong, copies)
    pseudo = torch.randint(0, data.spec.num_classes, (len(data.train),))
    ones = torch.ones(len(data.train))
    shape = (cfg.batch_size * cfg.aug_num, data.spec.channels, data.spec.image_size, data.spec.image_size)
    common = {"kind": "ssl", "device": str(device), "arch": args.arch, "image_size": args.image_size,
              "labels": args.labels, "batch": cfg.batch_size, "labeled_batch": cfg.labeled_batch_size,
              "aug_num": cfg.aug_num, "workers": loaders.workers, **opts}

    def epoch(e):
        batches = loaders.composite_batches(e, data.targets, pseudo, ones)
        _sync(device)
        t0 = time.perf_counter()
        losses = train_epoch(fwd, opt, batches, sched.ssl_steps, lambda s: cfg.lr, device, prec, augment,
                             mixup_alpha=cfg.mixup_alpha, channels_last=cfg.channels_last,
                             fused_copies=cfg.fused_copies)
        float(losses.sum())                                     # waits for the last step
        return len(losses), time.perf_counter() - t0
    epoch(0)                                                    # warm-up: workers, autotuning, compile
    steps, seconds = epoch(1)
    epoch_ips = steps * shape[0] / seconds

    x = torch.randn(cfg.batch_size, cfg.aug_num, *shape[1:], device=device)      # (B, A, C, H, W)
    y = torch.randint(0, data.spec.num_classes, (cfg.batch_size,), device=device)
    w = torch.ones(cfg.batch_size, device=device)

    def bare_step():           # the same loss as the epoch (one pass per copy, or --fused-copies)
        loss = copies_loss(fwd, x, y, w, 1.0, None, prec, channels_last=cfg.channels_last, fused=cfg.fused_copies)
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
    for _ in range(args.warmup):
        bare_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        bare_step()
    _sync(device)
    bare_ips = steps * shape[0] / (time.perf_counter() - t0)
    return [{**common, "measure": "epoch", "steps": steps, "seconds": round(seconds, 2),
             "images_per_s": round(epoch_ips, 1), "bare_images_per_s": round(bare_ips, 1),
             "ratio": round(epoch_ips / bare_ips, 3)}]


# The pretraining recipes the drl kind runs at: (config fields, image shape (C, H)).
DRL_RECIPES = {
    # the Fashion-MNIST protocol (configs/tables/scales.yaml, fmnist): WRN-10-1, small score net, batch 64
    "fmnist": ({"dataset": "fashion-mnist", "arch": "wrn-10-1", "batch_size": "64", "nf": "16",
                "ch_mult": "1,2", "num_res_blocks": "2", "attn_resolutions": ""}, (1, 28)),
    # digits as configs/drl/digits.yaml sets it (WRN-28-2 encoder, 8x8 score net, batch 64)
    "digits": ({"dataset": "digits"}, (1, 8)),
    # the published CIFAR-10 pretraining: NCSN++ small, WRN-28-2, batch 100
    "cifar10": ({"dataset": "cifar10"}, (3, 32)),
}


def drl_throughput(args, opts, device) -> list:
    """One line: whole pretraining steps through the real loader (random images of the recipe's shape,
    the recipe's weak augmentation and loader workers) and :func:`pretrain_step`, next to the bare
    forward + backward + Adam step of the same models on one fixed batch (per-sample t)."""
    from laplacedrl.drl.data import pretraining_images, pretraining_loader
    from laplacedrl.drl.step import new_training, pretrain_step
    fields, (channels, size) = DRL_RECIPES[args.recipe]
    cli = {**fields, **{k: str(v) for k, v in opts.items() if k not in ("augment_on", "fused_copies")},
           "pretrain_data": "all"}
    if args.workers >= 0:
        cli["num_workers"] = str(args.workers)
    cfg = C.resolve(C.DRLConfig, cli)
    data = synthetic_data(args.images, size, channels, args.classes, 0)
    sde = make_sde(cfg)
    info = DistInfo()
    tr = new_training(DRLModels(cfg, data.spec, sde), cfg, info, device)
    _, transform = pretraining_images(cfg, data.train, data.spec)
    loader, workers = pretraining_loader(cfg, data.train, np.arange(len(data.train)), transform, 0, info,
                                         device)
    batches = iter(loader)

    def real_step():
        x0, _ = next(batches)
        pretrain_step(tr, x0[:, 0].to(device, non_blocking=True), cfg, sde)

    x = torch.randn(cfg.batch_size, channels, size, size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def bare_step():
        t = torch.rand(cfg.batch_size, device=device) * (1 - 1e-5) + 1e-5
        with tr.prec.autocast():
            loss = tr.fwd(x, t)["loss"]
        tr.opt.zero_grad(set_to_none=True)
        tr.prec.backward(loss)
        tr.prec.step(tr.opt)

    def rate(step):
        for _ in range(args.warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        return args.steps * cfg.batch_size / (time.perf_counter() - t0)
    tr.models.train()
    real = rate(real_step)
    bare = rate(bare_step)
    profile = {}
    if args.profile:            # where a whole step's time goes: the top operators by self time
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                real_step()
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops)
        profile = {"profile_self_time_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:12]}}
    return [{"kind": "drl", "recipe": args.recipe, "device": str(device), "threads": torch.get_num_threads(),
             "arch": cfg.arch, "image_size": size, "batch": cfg.batch_size, "workers": workers, **opts,
             "steps": args.steps, "real_images_per_s": round(real, 1), "bare_images_per_s": round(bare, 1),
             "ratio": round(real / bare, 3), "real_seconds_per_step": round(cfg.batch_size / real, 4), **profile}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="wrn-28-2")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=2000, help="training images of the random set")
    p.add_argument("--labels", type=int, default=40, help="labeled images among them")
    p.add_argument("--batch-size", type=int, default=100, help="SSL batch (LaplaceNet: 100)")
    p.add_argument("--labeled-batch-size", type=int, default=50)
    p.add_argument("--recipe", default="cifar10", choices=sorted(DRL_RECIPES),
                   help="drl kind: the pretraining recipe whose sizes are measured")
    p.add_argument("--aug-num", type=int, default=3)
    p.add_argument("--workers", type=int, default=-1, help="loader workers per loader (-1: as the CLIs)")
    p.add_argument("--steps", type=int, default=20, help="DRL steps timed (real and bare each)")
    p.add_argument("--warmup", type=int, default=3, help="untimed bare / DRL steps first")
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                   help="';'-separated configurations (see the module docstring)")
    p.add_argument("--kinds", default="ssl,drl")
    p.add_argument("--profile", action="store_true", help="drl: also the operators' share of a step's time")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    drl_seen = set()
    for text in args.configs.split(";"):
        opts = parse_config(text)
        for kind in args.kinds.split(","):
            if kind == "drl":  # pretraining has no RandAugment: one line per precision setting
                key = tuple(sorted((k, v) for k, v in opts.items() if k not in ("augment_on", "fused_copies")))
                if key in drl_seen:
                    continue
                drl_seen.add(key)
            torch.manual_seed(0)
            fn = ssl_throughput if kind == "ssl" else drl_throughput
            try:
                rows = fn(args, opts, device)
            except Exception as e:  # e.g. bf16 on a GPU without it, compile without a compiler
                rows = [{"kind": kind, "config": text, "device": str(device),
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}]
            for row in rows:
                print(json.dumps({"config": text, **row}), flush=True)


if __name__ == "__main__":
    main()
