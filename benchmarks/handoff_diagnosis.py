"""Why a pretrained start learns less: the hand-off diagnosis of train_ssl.py runs, one JSON line per run.

For each run dir made with ``--snapshot-epochs 0,10`` (the classifier before training and after the
ten supervised rounds), per group of the WRN body (stem, the three groups of blocks; conv weights):

* ``rel_grad``: ||g|| / ||w|| at the first step, g the gradient of the cross-entropy of the labeled
  images (eval transform, training-mode BatchNorm, as the first step sees them without augmentation);
* ``norm_ratio``: ||w|| / ||w_fresh||, w_fresh a fresh initialisation of the same architecture;
* ``rotation``: the angle (degrees) between the weights before and after the supervised rounds;
* ``spread``: the std of the residual stream entering the last BatchNorm over the training images
  (eval mode), before the rounds;
* the run's training loss after round 10 and its validation / test top-1 at ``--at`` epochs and at
  the end (from metrics.json).

    python benchmarks/handoff_diagnosis.py runs/ssl/drl-L10-s0 runs/ssl/scratch-L10-s0 ... > diag.jsonl

``--ckpt CKPT --seeds 0,1,2`` measures the hand-off quantities (``rel_grad``, ``norm_ratio``,
``spread``) of a pretraining checkpoint (or ``--ckpt scratch``) without a run, for the labeled images
that ``train_ssl.py --seed S`` draws with the remaining flags (``--labels``, ``--val-images``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from laplacedrl import config as C  # noqa: E402
from laplacedrl.data import AugmentedSubset, make_transform  # noqa: E402
from laplacedrl.models import build_model, classifier_from_record  # noqa: E402
from laplacedrl.ssl.handoff import unwrap  # noqa: E402
from laplacedrl.ssl.loaders import load_data  # noqa: E402

GROUPS = ("stem", "g1", "g2", "g3")


def group_of(name: str, blocks_per_group: int) -> str | None:
    """The group of a conv weight's name in a WRN body, None for anything else."""
    if not name.endswith("weight") or "bn" in name or "noise" in name or name.startswith("head"):
        return None
    if name.startswith("stem."):
        return "stem"
    if name.startswith("blocks."):
        return f"g{int(name.split('.')[1]) // blocks_per_group + 1}"
    return None


def grouped(named, bpg):
    out = {g: [] for g in GROUPS}
    for n, t in named:
        g = group_of(n, bpg)
        if g is not None and t.dim() == 4:
            out[g].append((n, t))
    return out


def load_classifier(path: Path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = classifier_from_record(ck["classifier"])
    model.load_state_dict(ck["model"])
    return model, ck


def tensor_of(dataset, rows, spec):
    sub = AugmentedSubset(dataset, np.asarray(rows), make_transform(spec, "eval"))
    return torch.stack([sub[i][0][0] for i in range(len(sub))])


def handoff(m0, data) -> dict:
    """Relative gradients at the first step, weight-norm ratios against a fresh init, stream spread."""
    body0 = unwrap(m0)
    bpg = len(body0.blocks) // 3
    torch.manual_seed(12345)
    fresh = build_model(**{k: v for k, v in body0.config.items()})
    x_lab = tensor_of(data.train, data.lab_idx, data.spec)
    y_lab = data.targets[data.lab_idx]
    # relative gradients at the first step (training-mode BN, no augmentation)
    m0.train()
    m0.zero_grad()
    F.cross_entropy(m0(x_lab)[0], y_lab).backward()
    g0 = grouped(body0.named_parameters(), bpg)
    rel = {g: math.sqrt(sum(float(p.grad.norm()) ** 2 for _, p in ps)) /
           math.sqrt(sum(float(p.detach().norm()) ** 2 for _, p in ps)) for g, ps in g0.items()}
    norms = {g: math.sqrt(sum(float(p.detach().norm()) ** 2 for _, p in ps)) for g, ps in g0.items()}
    fr = grouped(fresh.named_parameters(), bpg)
    ratio = {g: norms[g] / math.sqrt(sum(float(p.detach().norm()) ** 2 for _, p in ps)) for g, ps in fr.items()}
    # spread of the residual stream entering the last BN (eval mode, every training image)
    m0.eval()
    seen = []
    hook = body0.bn_out.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        x_all = tensor_of(data.train, np.arange(len(data.train)), data.spec)
        for i in range(0, len(x_all), 500):
            m0(x_all[i:i + 500])
    hook.remove()
    return {"rel_grad": rel, "norm_ratio": ratio, "spread": float(torch.cat(seen).std())}


def rotation(m0, m10) -> dict:
    """Degrees between the conv weights of each group before and after the supervised rounds."""
    body0, body10 = unwrap(m0), unwrap(m10)
    bpg = len(body0.blocks) // 3
    g0 = grouped(body0.named_parameters(), bpg)
    w10 = dict(grouped(body10.named_parameters(), bpg))
    rot = {}
    for g, ps in g0.items():
        a = torch.cat([p.detach().flatten() for _, p in ps]).double()
        b = torch.cat([p.detach().flatten() for _, p in w10[g]]).double()
        rot[g] = math.degrees(math.acos(float(torch.clamp(a @ b / (a.norm() * b.norm()), -1, 1))))
    return rot


def diagnose(run: Path, at: list) -> dict:
    cfg = C.from_dict(C.SSLConfig, yaml.safe_load((run / "config.yaml").read_text()))
    data = load_data(cfg)
    m0, _ = load_classifier(run / "snapshots" / "epoch_0000.pt")
    m10, _ = load_classifier(run / "snapshots" / "epoch_0010.pt")
    rot = rotation(m0, m10)
    state = handoff(m0, data)
    metrics = json.loads((run / "metrics.json").read_text())
    hist = metrics["history"]
    sup_loss = next((h["loss"] for h in hist if h["epoch"] == 10), None)
    acc_at = {str(e): next((h["test_top1"] for h in hist if h["epoch"] == e), None) for e in at}
    return {"run": run.name, "init": cfg.init, "seed": cfg.seed, "labels": cfg.labels,
            **state, "rotation_deg": rot,
            "loss_round10": sup_loss, "top1_at": acc_at, "top1_final": metrics.get("test_top1"),
            "pl_acc_first": next((h.get("pseudo_label_acc") for h in hist if h["epoch"] == 11), None),
            "pl_acc_last": hist[-1].get("pseudo_label_acc") if hist else None,
            "epochs_done": metrics.get("epochs_done")}


def at_handoff(ckpt: str, seed: int, flags: dict) -> dict:
    """The hand-off quantities of a pretraining checkpoint (or "scratch") for seed's labeled images."""
    from laplacedrl.engine.checkpoint import init_values
    from laplacedrl.ssl.model import init_classifier
    from laplacedrl.engine.seeds import derive_seed, seed_everything
    given = {**flags, "seed": seed, **({} if ckpt == "scratch" else {"init": ckpt})}
    cfg = C.resolve(C.SSLConfig, given, init_values=init_values)
    data = load_data(cfg)
    seed_everything(derive_seed(cfg.seed, "init"))
    return {"ckpt": ckpt, "seed": seed, **handoff(init_classifier(cfg, data.spec), data)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--at", default="21", help="epochs at which to report the top-1 too (comma list)")
    p.add_argument("--ckpt", action="append", default=[], help="a pretraining checkpoint, or scratch")
    p.add_argument("--seeds", default="0", help="with --ckpt: the seeds (comma list)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--val-images", type=int, default=0)
    a = p.parse_args(argv)
    flags = {"dataset": a.dataset, "labels": a.labels, "val_images": a.val_images}
    torch.set_num_threads(1)
    at = [int(v) for v in a.at.split(",") if v]
    for run in a.runs:
        print(json.dumps(diagnose(run, at)), flush=True)
    for ckpt in a.ckpt:
        for seed in [int(v) for v in a.seeds.split(",")]:
            print(json.dumps(at_handoff(ckpt, seed, flags)), flush=True)


if __name__ == "__main__":
    main()
