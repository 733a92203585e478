#!/usr/bin/env python
"""Training throughput (images/s) of one SSL step and one DRL pretraining step, per configuration.

Runs the project's own step code (``laplacenet.train_epoch`` and the ``DRLModels`` forward) on random
CIFAR-shaped data, so what it measures is what the CLIs run. One JSON line per configuration::

    python benchmarks/throughput.py --device cuda                       # the default grid
    python benchmarks/throughput.py --device cpu --configs cpu-aug,fp32 --steps 3

A configuration is a comma list of: ``cpu-aug`` (PIL RandAugment in DataLoader workers, the
published path) or ``gpu-aug`` (batched tensor augmentation on the device), ``fp32`` / ``bf16`` /
``fp16``, ``cl`` (channels-last), ``compile`` (torch.compile). "images/s" counts every augmented
copy the network sees (batch x aug_num per SSL step; batch per DRL step).
"""
import argparse
import json
import time

import numpy as np
import torch

from laplacedrl import config as C
from laplacedrl.data import AugmentedSubset
from laplacedrl.data.datasets import CIFAR10_MEAN, CIFAR10_STD, ArrayImageSet, DatasetSpec, index_names
from laplacedrl.diffusion.pretrain import DRLModels, make_sde
from laplacedrl.engine.run import Precision, prepare_model
from laplacedrl.models import build_model
from laplacedrl.ssl.laplacenet import _loader, endless, make_augmentation, make_optimizer, train_epoch

DEFAULT_CONFIGS = ["cpu-aug,fp32", "gpu-aug,fp32", "gpu-aug,bf16,cl", "gpu-aug,bf16,cl,compile"]


def synthetic_set(n: int, size: int, channels: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    targets = rng.integers(0, classes, n)
    names = [str(c) for c in range(classes)]
    spec = DatasetSpec("synthetic", classes, channels, size, CIFAR10_MEAN[:channels],
                       CIFAR10_STD[:channels], size // 8, True)
    return ArrayImageSet(images, targets, names, index_names(targets, names)), spec


def parse_config(text: str) -> dict:
    parts = set(text.split(","))
    amp = next((p for p in ("bf16", "fp16") if p in parts), "off")
    return {"augment_on": "device" if "gpu-aug" in parts else "cpu", "amp": amp,
            "channels_last": "cl" in parts, "compile": "compile" in parts}


def ssl_throughput(args, opts, device, data, spec) -> float:
    cfg = C.resolve(C.SSLConfig, {"dataset": "cifar10", "arch": args.arch, "aug_num": str(args.aug_num),
                                  "batch_size": str(args.batch_size), "num_workers": str(args.workers),
                                  "labeled_batch_size": str(args.batch_size // 2),
                                  **{k: str(v) for k, v in opts.items()}})
    weak, strong, copies, augment = make_augmentation(cfg, spec, device)
    model, _ = prepare_model(build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size),
                             cfg, device)
    fwd = torch.compile(model) if cfg.compile else model
    opt, prec = make_optimizer(cfg, model), Precision(cfg.amp, device)
    half = cfg.batch_size // 2
    lab = endless(lambda i: _loader(AugmentedSubset(data, np.arange(len(data)), weak, copies), half,
                                    cfg, seed=i, shuffle=True, drop_last=True))
    unl = endless(lambda i: _loader(AugmentedSubset(data, np.arange(len(data)), strong, copies),
                                    cfg.batch_size - half, cfg, seed=i + 1, shuffle=True, drop_last=True))
    targets = torch.as_tensor(data.targets)

    def batches():
        for (xl, il), (xu, iu) in zip(lab, unl):
            yield (torch.cat([xl, xu]), targets[torch.cat([il, iu])], torch.ones(len(il) + len(iu)),
                   len(il))
    it = iter(batches())
    train_epoch(fwd, opt, it, args.warmup, cfg, lambda f: cfg.lr, device, prec, augment)  # + compile
    _sync(device)
    t0 = time.perf_counter()
    train_epoch(fwd, opt, it, args.steps, cfg, lambda f: cfg.lr, device, prec, augment)
    _sync(device)
    return args.steps * cfg.batch_size * cfg.aug_num / (time.perf_counter() - t0)


def drl_throughput(args, opts, device, data, spec) -> float:
    cfg = C.resolve(C.DRLConfig, {"dataset": "cifar10", "arch": args.arch,
                                  "batch_size": str(args.drl_batch_size),
                                  **{k: str(v) for k, v in opts.items() if k != "augment_on"}})
    sde = make_sde(cfg)
    models, _ = prepare_model(DRLModels(cfg, spec, sde), cfg, device)
    fwd = torch.compile(models) if cfg.compile else models
    opt, prec = torch.optim.Adam(models.parameters(), lr=cfg.lr), Precision(cfg.amp, device)
    x = torch.randn(cfg.batch_size, spec.channels, spec.image_size, spec.image_size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        t = torch.rand(cfg.batch_size, device=device) * (1 - 1e-5) + 1e-5
        with prec.autocast():
            loss = fwd(x, t)["loss"]
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
    for _ in range(args.warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return args.steps * cfg.batch_size / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="wrn-28-2")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=2000, help="size of the random image set")
    p.add_argument("--batch-size", type=int, default=100, help="SSL batch (LaplaceNet: 100)")
    p.add_argument("--drl-batch-size", type=int, default=128)
    p.add_argument("--aug-num", type=int, default=3)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for cpu-aug")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--configs", default=";".join(DEFAULT_CONFIGS),
                   help="';'-separated configurations (see the module docstring)")
    p.add_argument("--kinds", default="ssl,drl")
    args = p.parse_args()
    device = torch.device(args.device)
    data, spec = synthetic_set(args.images, args.image_size, args.channels, args.classes)
    drl_seen = set()
    for text in args.configs.split(";"):
        opts = parse_config(text)
        for kind in args.kinds.split(","):
            if kind == "drl":  # pretraining has no RandAugment: one line per precision setting
                key = tuple(sorted((k, v) for k, v in opts.items() if k != "augment_on"))
                if key in drl_seen:
                    continue
                drl_seen.add(key)
            torch.manual_seed(0)
            fn = ssl_throughput if kind == "ssl" else drl_throughput
            try:
                ips = fn(args, opts, device, data, spec)
                row = {"images_per_s": round(ips, 1)}
            except Exception as e:  # e.g. bf16 on a GPU without it, compile without a compiler
                row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(json.dumps({"kind": kind, "config": text, "device": str(device), "arch": args.arch,
                              "image_size": args.image_size, **opts, **row}), flush=True)


if __name__ == "__main__":
    main()
