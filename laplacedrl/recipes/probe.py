"""The probe recipe behind ``python -m laplacedrl.probe``: frozen-encoder probes over the diffusion
time t (paper Sec. 3.1, App. E, H: Fig. 4, 8, 12).

The encoder of a pretrain_drl.py checkpoint is frozen; for t = 0.0, 0.1, ..., 1.0 the code of an
image is its penultimate feature ``E(x, t) = encoder(x, noise=sde.net_input(t))[1]`` (the
checkpoint's SDE; t = 0 is evaluated at ``sde.eps`` = 1e-5, where the VP SDE's input is finite),
computed for every training and test image with the evaluation transform. At each t:

- ``mlp_acc`` (Fig. 4): test accuracy (%) of a one-hidden-layer MLP (``--mlp-hidden`` ReLU units,
  Adam lr 1e-3, batch 256, ``--mlp-epochs`` epochs) trained on the codes of all training images,
  standardised with the training codes' mean and std;
- ``svm<n>_acc`` (Fig. 8): test accuracy (%) of scikit-learn's ``SVC()`` (default settings) fitted on
  the raw codes of ``n`` class-balanced labeled training images, for each n of ``--svm-labels``
  (default 100 and 1000 as in the paper; 20 and 100 on digits' 1297 training images);
- ``silhouette`` (Fig. 12): the silhouette score of the test codes grouped by class (Euclidean; at
  most 10000 codes, a seeded sample beyond that).

Baselines in the same CSV and plot: the encoders of other checkpoints (``--ae-ckpt``, ``--also``;
named by their objective, ``<objective>@<step>`` where two share one, e.g. the ``snapshots/`` of one
pretraining) and a randomly initialised encoder of the same architecture fed the same SDE (on
unless ``--no-random``). ``--classifier [NAME=]PATH`` adds a train_ssl.py classifier (a run's
``last.pt`` or a ``snapshots/epoch_<k>.pt``): its features at its own t, one row (t empty for a
classifier without a learnable t), e.g. to follow what the supervised rounds do to a pretrained code.

``--val-images N`` measures on N held-out training images instead of the test set (the fixed draw
of ``train_ssl.py --val-images``; the codes are fitted on the other training images): for choosing
a pretraining setting without looking at the test set.
Everything seeded by ``--seed``. Writes ``probe.csv`` (one row per encoder and t), ``probe.png``
(Agg) and TensorBoard scalars ``<encoder>/<metric>`` at step ``round(100 t)`` plus the figure.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from laplacedrl.errors import UserError

TS = tuple(round(0.1 * i, 1) for i in range(11))
SILHOUETTE_MAX = 10000


# ============ encoders ============
def random_encoder(arch: dict, seed: int):
    """A freshly initialised encoder of architecture ``arch`` (``build_model`` record), seeded."""
    from laplacedrl.engine.seeds import derive_seed, seed_everything
    from laplacedrl.models import build_model
    seed_everything(derive_seed(seed, "probe", 0))
    return build_model(**arch).eval()


@dataclass
class Probed:
    """One encoder the probe measures: ``code(x, t)`` (B, D) at each t of ``ts``."""

    name: str
    module: nn.Module
    code: Callable
    ts: tuple


def timed_encoder(name: str, enc, sde) -> Probed:
    """A pretrained (or random) time-conditioned encoder over :data:`TS`; t is clamped to
    ``>= sde.eps``."""
    def code(x, t):
        tt = torch.full((x.shape[0],), max(float(t), sde.eps), device=x.device)      # (B,)
        return enc(x, noise=sde.net_input(tt))[1]
    return Probed(name, enc, code, TS)


def classifier_encoder(name: str, model) -> Probed:
    """A train_ssl.py classifier: its penultimate features at its own (learned) t, one row."""
    t = float(model.t.detach()) if hasattr(model, "t") else float("nan")
    return Probed(name, model, lambda x, _: model(x)[1], (round(t, 4),))


@torch.no_grad()
def extract_codes(encoders: list, loader, device) -> dict:
    """Codes of every image of ``loader`` for every encoder at each of its t, in one pass.

    ``loader`` yields ``(x (B, 1, C, H, W), index)`` (an AugmentedSubset with the eval transform).
    Returns ``name -> float32 array (len(ts), N, D)``.
    """
    out = {e.name: [[] for _ in e.ts] for e in encoders}
    for x, _ in loader:
        x = x[:, 0].to(device)                                           # (B, C, H, W)
        for e in encoders:
            for i, t in enumerate(e.ts):
                out[e.name][i].append(e.code(x, t).float().cpu())         # (B, D)
    return {name: np.stack([torch.cat(chunks).numpy() for chunks in per_t]) for name, per_t in out.items()}


# ============ the three probes ============
def mlp_accuracy(xtr, ytr, xte, yte, num_classes: int, hidden: int = 256, epochs: int = 50,
                 seed: int = 0, *, device="cpu", batch: int = 256, lr: float = 1e-3) -> float:
    """Test accuracy (%) of ``Linear(D, hidden) -> ReLU -> Linear(hidden, C)`` trained with Adam on
    cross-entropy over ``(xtr, ytr)``; inputs standardised by the training mean and std."""
    from laplacedrl.engine.seeds import derive_seed, seed_everything, torch_generator
    seed_everything(derive_seed(seed, "probe", 1))
    g = torch_generator(seed, "probe", 2)
    xtr, xte = (torch.as_tensor(v, dtype=torch.float32) for v in (xtr, xte))  # (N, D), (M, D)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = ((xtr - mu) / sd).to(device), ((xte - mu) / sd).to(device)
    ytr = torch.as_tensor(ytr, dtype=torch.long).to(device)
    net = nn.Sequential(nn.Linear(xtr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            idx = idx.to(device)
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = net(xte).argmax(1).cpu().numpy()
    return 100.0 * float(np.mean(pred == np.asarray(yte)))


def svm_accuracy(xtr, ytr, xte, yte, n_labels: int, num_classes: int, seed: int = 0) -> float:
    """Test accuracy (%) of ``sklearn.svm.SVC()`` fitted on ``n_labels`` class-balanced training codes."""
    from sklearn.svm import SVC

    from laplacedrl.data import balanced_split
    idx = balanced_split(ytr, n_labels, num_classes, seed)
    clf = SVC().fit(xtr[idx], np.asarray(ytr)[idx])
    return 100.0 * float(np.mean(clf.predict(xte) == np.asarray(yte)))


def silhouette(x, y, seed: int = 0, max_n: int = SILHOUETTE_MAX) -> float:
    """Mean silhouette ``(b - a) / max(a, b)`` of the codes ``x`` (N, D) grouped by ``y`` (N,)."""
    from sklearn.metrics import silhouette_score
    return float(silhouette_score(x, y, sample_size=max_n if len(x) > max_n else None, random_state=seed))


def probe_rows(name: str, tr_codes, ytr, te_codes, yte, ts, num_classes: int, svm_labels, *, opts,
               device) -> list:
    """One CSV row per t for one encoder: ``{encoder, t, mlp_acc, svm<n>_acc..., silhouette}``."""
    rows = []
    for i, t in enumerate(ts):
        xtr, xte = tr_codes[i], te_codes[i]
        row = {"encoder": name, "t": t}
        if opts.mlp_epochs:
            row["mlp_acc"] = mlp_accuracy(xtr, ytr, xte, yte, num_classes, opts.mlp_hidden, opts.mlp_epochs,
                                          opts.seed, device=device)
        for n in svm_labels:
            row[f"svm{n}_acc"] = svm_accuracy(xtr, ytr, xte, yte, n, num_classes, opts.seed)
        row["silhouette"] = silhouette(xte, yte, opts.seed)
        rows.append(row)
    return rows


# ============ outputs ============
def metric_names(rows) -> list:
    return [k for k in rows[0] if k not in ("encoder", "t")]


def write_csv(rows, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["encoder", "t", *metric_names(rows)], lineterminator="\n")
        w.writeheader()
        w.writerows({**r, **{k: f"{v:.4f}" for k, v in r.items() if isinstance(v, float) and k != "t"}}
                    for r in rows)


def make_figure(rows, title: str, eval_set: str = "test"):
    """Three panels against t: MLP accuracy, SVC accuracy (one line style per label count),
    silhouette; one colour per encoder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["encoder"] for r in rows))
    svm = [k for k in metric_names(rows) if k.startswith("svm")]
    panels = [("MLP on frozen codes (Fig. 4)", ["mlp_acc"], f"{eval_set} accuracy (%)"),
              ("SVC on few labeled codes (Fig. 8)", svm, f"{eval_set} accuracy (%)"),
              (f"silhouette of {eval_set} codes (Fig. 12)", ["silhouette"], "silhouette score")]
    panels = [p for p in panels if p[1][0] in rows[0]]                  # no MLP panel with --mlp-epochs 0
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (panel, keys, ylabel) in zip(axes, panels):
        for c, name in enumerate(names):
            sel = [r for r in rows if r["encoder"] == name]
            for s, key in enumerate(keys):
                label = name + (f" ({key[3:-4]} labels)" if key.startswith("svm") else "")
                ax.plot([r["t"] for r in sel], [r[key] for r in sel], marker="o", ms=3, color=f"C{c}",
                        linestyle=("-", "--", ":", "-.")[s % 4], label=label)
        ax.set(title=panel, xlabel="diffusion time t", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def log_tensorboard(rows, fig, out: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out)) as w:
        for r in rows:
            for k in metric_names(rows):
                w.add_scalar(f"{r['encoder']}/{k}", r[k], 0 if np.isnan(r["t"]) else round(100 * r["t"]))
        w.add_figure("probe", fig, close=False)


# ============ the recipe ============
def parse_counts(text: str, dataset: str) -> list:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()] if text else \
            ([20, 100] if dataset == "digits" else [100, 1000])
    except ValueError:
        raise UserError(f"--svm-labels must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise UserError(f"--svm-labels must be positive integers, got {text!r}")
    return counts


def probe(opts) -> list:
    """The probes of the module docstring for the encoders ``opts`` names (the parsed flags of
    ``python -m laplacedrl.probe``): every encoder's codes of every image at every t, then per
    encoder and t the MLP, the SVCs and the silhouette; ``probe.csv``, ``probe.png`` and TensorBoard
    in ``--out``. Returns the rows."""
    if opts.val_images < 0:
        raise UserError(f"--val-images must be >= 0, got {opts.val_images}")
    from torch.utils.data import DataLoader

    from laplacedrl.data import AugmentedSubset, load_dataset, make_transform
    from laplacedrl.data.datasets import carve
    from laplacedrl.data.streams import loader_workers
    from laplacedrl.engine.checkpoint import load_classifier, load_encoder
    from laplacedrl.engine.run import pick_device
    from laplacedrl.engine.seeds import numpy_rng
    from laplacedrl.models import arch_record

    if not opts.ckpt and not opts.classifier:
        raise UserError("give --ckpt (a pretrain_drl.py ckpt.pt) and/or --classifier (a train_ssl.py run)")
    device = pick_device(opts.device)
    encoders, source, ckpt_sde = [], None, None

    def unique(name):
        while name in {e.name for e in encoders}:
            name += "'"
        return name
    pretrained = [(opts.ckpt, "--ckpt")] * bool(opts.ckpt) + [(opts.ae_ckpt, "--ae-ckpt")] * bool(opts.ae_ckpt) \
        + [(p, "--also") for p in opts.also]
    for path, what in pretrained:
        enc, sde, ck = load_encoder(path, what)
        name = ck["objective"]
        if any(e.name == name for e in encoders):
            name += f"@{ck['step']}"
        encoders.append(timed_encoder(unique(name), enc, sde))
        source = source or ck["dataset"]
        ckpt_sde = sde if what == "--ckpt" else ckpt_sde
    for spec_text in opts.classifier:
        name, _, path = spec_text.rpartition("=")
        model, ck = load_classifier(path, "--classifier")
        run_dir = Path(path).parent.parent if Path(path).parent.name == "snapshots" else Path(path).parent
        encoders.append(classifier_encoder(unique(name or f"{run_dir.name}@{ck['epoch']}"), model))
        source = source or {"name": ck["config"]["dataset"], "data_dir": ck["config"].get("data_dir")}
    if opts.ckpt and opts.random:
        encoders.append(timed_encoder("random", random_encoder(arch_record(encoders[0].module), opts.seed),
                                      ckpt_sde))
    dataset = opts.dataset or source["name"]
    train, test, spec = load_dataset(dataset, opts.data_dir or source.get("data_dir") or None)
    train, test, eval_set = carve(train, test, val_images=opts.val_images)
    for e in encoders:
        cfg = arch_record(e.module)
        if (cfg["in_channels"], cfg["image_size"]) != (spec.channels, spec.image_size):
            raise UserError(f"the {e.name} encoder takes {cfg['in_channels']}x{cfg['image_size']}"
                            f"x{cfg['image_size']} images, {dataset} has {spec.channels}x"
                            f"{spec.image_size}x{spec.image_size}")
        e.module.to(device)
    svm_labels = parse_counts(opts.svm_labels, dataset)

    # ============ codes of every image at every t ============
    tr_idx = np.arange(len(train))
    if 0 < opts.max_train < len(train):
        tr_idx = np.sort(numpy_rng(opts.seed, "probe", 3).permutation(len(train))[: opts.max_train])
    if max(svm_labels) > len(tr_idx):
        raise UserError(f"--svm-labels {max(svm_labels)} exceeds the {len(tr_idx)} training images")
    evalt = make_transform(spec, "eval")

    def loader(imageset, idx):
        return DataLoader(AugmentedSubset(imageset, idx, evalt), batch_size=opts.batch_size,
                          num_workers=loader_workers(opts.num_workers))
    tr_codes = extract_codes(encoders, loader(train, tr_idx), device)
    te_codes = extract_codes(encoders, loader(test, np.arange(len(test))), device)
    ytr, yte = train.targets[tr_idx], test.targets

    # ============ probes, outputs ============
    rows = []
    for e in encoders:
        rows += probe_rows(e.name, tr_codes[e.name], ytr, te_codes[e.name], yte, e.ts, spec.num_classes,
                           svm_labels, opts=opts, device=device)
    first = Path(opts.ckpt or opts.classifier[0].rpartition("=")[2])
    out = Path(opts.out or first.parent / "probe")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "probe.csv")
    fig = make_figure(rows, f"{first} on {dataset} ({len(tr_idx)} train / {len(test)} {eval_set})",
                      eval_set)
    fig.savefig(out / "probe.png", dpi=120)
    log_tensorboard(rows, fig, out)
    for r in rows:
        if r["t"] in (0.1, 0.5, 0.9) or not any(r["t"] == t for t in TS):
            print(f"{r['encoder']:>8} t={r['t']:.4g} " + " ".join(f"{k} {r[k]:.3f}" for k in metric_names(rows)))
    print(f"wrote {out / 'probe.csv'} and {out / 'probe.png'}")
    return rows
