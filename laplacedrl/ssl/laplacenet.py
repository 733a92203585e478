"""The LaplaceNet loop: supervised rounds, then graph pseudo-labels + one semi-supervised epoch each.

The schedule is a list of epochs: ``sup_rounds`` supervised rounds (each ``sup_passes`` passes over
the labeled images), then the semi-supervised epochs, as many as ``--epochs`` says or as LaplaceNet's
step budget allows (:func:`make_schedule`); ``--max-epochs`` stops early while the learning rate
keeps the full schedule. Every epoch ends with an evaluation, a ``metrics.json`` and an atomic
``last.pt``, so a killed run resumes at the next epoch boundary and re-running a finished command
does nothing. ``train_ssl`` reads as its steps: data, run dir, model, resume, the epoch loop, record.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import AugmentedSubset, labeled_indices, load_run_dataset, make_transform, write_label_file
from laplacedrl.data.streams import BatchStream, SeededItems, loader_workers, make_loader
from laplacedrl.engine.checkpoint import DRL_CKPT, SSL_RUN, load_checkpoint, load_encoder, load_state
from laplacedrl.engine.distributed import (all_reduce_mean, barrier, broadcast_object, cleanup,
                                           epoch_shard, gather_rows, init_distributed, shard,
                                           wrap_ddp)
from laplacedrl.engine.run import Precision, RunDir, check_finite, log, prepare_model, run_name
from laplacedrl.engine.seeds import derive_seed, seed_everything
from laplacedrl.errors import UserError
from laplacedrl.graph import propagate
from laplacedrl.graph.knn import faiss_gpu_count, resolve_backend
from laplacedrl.models import LearnableTime, build_model, classifier_record
from laplacedrl.ssl.mixup import mixup_batch, mixup_cross_entropy

T_SEARCH_VALUES = tuple(float(t) for t in np.linspace(0.0, 1.0, 11).clip(0.01, 0.99))


# ============ pure pieces ============
def cosine_lr(base_lr: float, epoch: float, total_epochs: int) -> float:
    """LaplaceNet's rampdown: ``lr * (cos(pi * epoch / (total + 10)) + 1) / 2``, ``epoch`` fractional."""
    return base_lr * 0.5 * (math.cos(math.pi * epoch / (total_epochs + 10)) + 1.0)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list:
    """Number of rows whose label is among the top-k logits, for each k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == y[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


@dataclasses.dataclass
class Schedule:
    """Epochs, steps and learning rates of a run (see :func:`make_schedule`)."""

    sup_rounds: int
    sup_passes: int
    pass_steps: int      # optimiser steps of one pass over the labeled images (full batches)
    lab_batch: int       # labeled images per supervised step
    ssl_epochs: int
    ssl_steps: int       # optimiser steps of one semi-supervised epoch
    stop: int            # epochs actually run (--max-epochs), <= total

    @property
    def total(self) -> int:
        return self.sup_rounds + self.ssl_epochs

    def phase(self, epoch: int) -> str:
        return "sup" if epoch < self.sup_rounds else "ssl"

    def steps(self, epoch: int) -> int:
        return self.sup_passes * self.pass_steps if self.phase(epoch) == "sup" else self.ssl_steps

    def lr(self, base_lr: float, epoch: int, step: int) -> float:
        """LaplaceNet's per-step rate: a supervised round repeats the epoch's span once per pass
        (the published loop calls its epoch function once per pass with the same epoch number)."""
        if self.phase(epoch) == "sup":
            return cosine_lr(base_lr, epoch + (step % self.pass_steps) / self.pass_steps, self.total)
        return cosine_lr(base_lr, epoch + step / self.ssl_steps, self.total)

    def summary(self, base_lr: float) -> dict:
        """What ``--print-config`` shows: the epochs, the steps and the last learning rate of the run."""
        last = self.stop - 1
        return {"supervised_rounds": self.sup_rounds, "supervised_steps_per_round": self.steps(0),
                "semi_supervised_epochs": self.ssl_epochs, "steps_per_semi_supervised_epoch": self.ssl_steps,
                "epochs_total": self.total, "epochs_run": self.stop,
                "steps_run": sum(self.steps(e) for e in range(self.stop)),
                "lr_at_last_step": round(self.lr(base_lr, last, self.steps(last) - 1), 6) if self.stop else None}


def make_schedule(cfg, n_labeled: int, n_unlabeled: int) -> Schedule:
    """LaplaceNet's schedule: supervised passes of full labeled batches (the remainder of each pass is
    dropped), semi-supervised epochs of ``floor(unlabeled / pseudo-labeled batch)`` steps, and unless
    ``--epochs`` is given, ``floor((num_steps - supervised steps) / ssl steps)`` of them."""
    lab_batch = min(cfg.batch_size, n_labeled)
    pass_steps = max(1, n_labeled // lab_batch)
    ssl_steps = max(1, n_unlabeled // (cfg.batch_size - cfg.labeled_batch_size))
    sup_steps = cfg.sup_rounds * cfg.sup_passes * pass_steps
    ssl_epochs = cfg.epochs or max(0, (cfg.num_steps - sup_steps) // ssl_steps)
    total = cfg.sup_rounds + ssl_epochs
    return Schedule(cfg.sup_rounds, cfg.sup_passes, pass_steps, lab_batch, ssl_epochs, ssl_steps,
                    min(total, cfg.max_epochs) if cfg.max_epochs else total)


# ============ data ============
@dataclasses.dataclass
class SSLData:
    train: object
    test: object
    spec: object
    lab_idx: np.ndarray          # (L,) labeled training indices
    unl_idx: np.ndarray          # (U,) the others
    targets: torch.Tensor        # (N,) true training labels (only labeled ones reach the loss)
    eval_kind: str = "test"      # what ``test`` is: the test set, or held-out training images


def load_data(cfg) -> SSLData:
    """The dataset and its labeled / unlabeled split; every input error surfaces here."""
    train, test, spec, kind = load_run_dataset(cfg)
    lab_idx = labeled_indices(cfg, train, spec)
    is_lab = np.zeros(len(train), bool)
    is_lab[lab_idx] = True
    return SSLData(train, test, spec, lab_idx, np.flatnonzero(~is_lab), torch.as_tensor(train.targets), kind)


def make_augmentation(cfg, spec, device):
    """Where the aug_num copies are made: by PIL in the loader, or batched on the training device.

    Returns (weak transform, strong transform, copies per loader item, augment(x, n_labeled)):
    the loop calls ``augment`` on each device batch to get (B, A, C, H, W).
    """
    if cfg.augment_on != "device":         # auto: the PIL path until the device path has run on a GPU
        return (make_transform(spec, "weak", cfg.ra_weak, cfg.cutout),
                make_transform(spec, "strong", cfg.ra_strong, cfg.cutout), cfg.aug_num,
                lambda x, n_lab: x)
    from laplacedrl.data.gpu_augment import BatchAugment, raw_transform
    weak = BatchAugment(spec, "weak", cfg.ra_weak, cfg.cutout).to(device)
    strong = BatchAugment(spec, "strong", cfg.ra_strong, cfg.cutout).to(device)

    def augment(x, n_lab):
        x = x[:, 0]                                                  # (B, C, H, W) in [0, 1]
        return torch.stack([torch.cat([weak(x[:n_lab]), strong(x[n_lab:])])
                            for _ in range(cfg.aug_num)], dim=1)
    return raw_transform(spec), raw_transform(spec), 1, augment


class Loaders:
    """The run's DataLoaders, built once (persistent workers); the epoch loop re-aims their streams.

    ``labeled``: endless stream of the labeled images (weak augmentation), one generator per
    (epoch, rank); a supervised round takes ``sup_passes`` passes of full batches, a semi-supervised
    epoch takes batches that run on across reshuffles. ``unlabeled``: one pass over this rank's
    slice of a (seed, epoch) permutation of the unlabeled images (strong augmentation).
    ``eval_train`` / ``eval_test`` / ``eval_labeled``: eval transform, dataset order.
    """

    def __init__(self, cfg, data: SSLData, sched: Schedule, info, device, weak, strong, copies):
        self.cfg, self.sched, self.info = cfg, sched, info
        self.workers = loader_workers(cfg.num_workers)
        ws, n_lab, n_unl = info.world_size, len(data.lab_idx), len(data.unl_idx)

        def labeled_order(epoch, pass_index, rng):
            perm = rng.permutation(n_lab)          # a supervised pass: full batches, the rest dropped
            return perm[: sched.pass_steps * self.lab_step(epoch)] if sched.phase(epoch) == "sup" else perm

        def unlabeled_order(epoch, pass_index, rng):
            return epoch_shard(n_unl, cfg.seed, epoch, info)

        self.lab_stream = BatchStream(labeled_order, 1, cfg.seed, "labeled", info.rank, endless=True)
        self.unl_stream = BatchStream(unlabeled_order, (cfg.batch_size - cfg.labeled_batch_size) // ws,
                                      cfg.seed, "unlabeled", info.rank)
        self.labeled = make_loader(SeededItems(AugmentedSubset(data.train, data.lab_idx, weak, copies)),
                                   self.workers, device, batch_sampler=self.lab_stream)
        self.unlabeled = make_loader(SeededItems(AugmentedSubset(data.train, data.unl_idx, strong, copies)),
                                     self.workers, device, batch_sampler=self.unl_stream)
        evalt = make_transform(data.spec, "eval")
        self.my_rows = shard(len(data.train), info)     # this rank's share of the feature extraction
        bs = cfg.eval_batch_size
        self.eval_train = make_loader(AugmentedSubset(data.train, self.my_rows, evalt), self.workers, device, bs)
        self.eval_test = make_loader(AugmentedSubset(data.test, np.arange(len(data.test)), evalt),
                                     self.workers, device, bs)
        self.eval_labeled = make_loader(AugmentedSubset(data.train, data.lab_idx, evalt), self.workers,
                                        device, bs)

    def lab_step(self, epoch: int) -> int:
        """Labeled images per step on this rank."""
        sup = self.sched.phase(epoch) == "sup"
        return (self.sched.lab_batch if sup else self.cfg.labeled_batch_size) // self.info.world_size

    def labeled_batches(self, epoch: int, targets):
        """(x, y, w, n_labeled) batches of labeled images only (supervised rounds)."""
        self.lab_stream.set_epoch(epoch, self.lab_step(epoch))
        for x, i in self.labeled:
            yield x, targets[i], torch.ones(len(i)), len(i)

    def composite_batches(self, epoch: int, targets, pseudo, weight):
        """Labeled + pseudo-labeled batches of a semi-supervised epoch."""
        self.lab_stream.set_epoch(epoch, self.lab_step(epoch))
        self.unl_stream.set_epoch(epoch)
        for (xl, il), (xu, iu) in zip(self.labeled, self.unlabeled):
            yield (torch.cat([xl, xu]), torch.cat([targets[il], pseudo[iu]]),
                   torch.cat([torch.ones(len(il)), weight[iu]]), len(il))


# ============ model ============
def build_classifier(cfg, spec):
    """LaplaceNet's WRN, or the ``--init`` encoder with a fresh head and a learnable t."""
    if not cfg.init:
        return build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size)
    pretrained = load_checkpoint(cfg.init, DRL_CKPT, "--init")["dataset"]
    if (pretrained["channels"], pretrained["image_size"]) != (spec.channels, spec.image_size):
        raise UserError(f"--init {cfg.init} was pretrained on {pretrained['channels']}x"
                        f"{pretrained['image_size']}x{pretrained['image_size']} images "
                        f"({pretrained['name']}), {cfg.dataset} has {spec.channels}x{spec.image_size}x"
                        f"{spec.image_size}")
    encoder, sde, ck = load_encoder(cfg.init, "--init")
    rec = dict(ck["encoder_arch"])
    backbone = build_model(**{**rec, "num_classes": spec.num_classes})
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    backbone.load_state_dict({**backbone.state_dict(), **state}, strict=True)   # the head stays fresh
    return LearnableTime(backbone, sde, cfg.t_init, trainable=not cfg.freeze_t)


def current_t(model):
    return float(model.t.detach()) if hasattr(model, "t") else None


def make_optimizer(cfg, model):
    """SGD (Nesterov) over every parameter, t included (published); ``--no-t-weight-decay`` exempts t."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = [p for n, p in params if n == "t_logit" and not cfg.t_weight_decay]
    rest = [p for n, p in params if not (n == "t_logit" and not cfg.t_weight_decay)]
    groups = [{"params": rest}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict(model, loader, device, progress=False, desc=""):
    """Logits and features of a whole (eval-transform) loader, in dataset order."""
    model.eval()
    logits, feats = [], []
    for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out, f = model(x[:, 0].to(device, non_blocking=True))
        logits.append(out.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(logits), torch.cat(feats)


def evaluate(model, loader, targets, device, progress=False) -> tuple:
    logits, _ = predict(model, loader, device, progress, "eval")
    c1, c5 = topk_correct(logits, torch.as_tensor(targets))
    return 100.0 * c1 / len(targets), 100.0 * c5 / len(targets)


# ============ the one training loop ============
def copies_loss(model, x, y, w, lam, perm, prec, channels_last=False, fused=False) -> torch.Tensor:
    """The loss of one step over A augmented copies: cross-entropy in float64, mixed by (lam, perm)
    when perm is given, averaged over the copies and weighted per sample by w (B,).

    ``x`` is (B, A, C, H, W). As published, each copy is one forward pass of B images, so every
    BatchNorm sees batches of B and its running statistics follow the copies in order (the last BN,
    momentum 0.9, ends near the last copy's). ``fused``: one forward pass of all B * A images (faster
    on GPUs; BatchNorm then normalises over every copy at once).
    """
    b, a = x.shape[:2]
    views = [x.flatten(0, 1)] if fused else [x[:, j] for j in range(a)]
    per = []
    for v in views:
        if channels_last:
            v = v.contiguous(memory_format=torch.channels_last)
        with prec.autocast():
            logits, _ = model(v)                                 # (B*A or B, C)
        per.append(mixup_cross_entropy(logits.double().view(b, -1, logits.shape[1]), y, lam, perm))
    per = torch.cat(per, dim=1)                                  # (B, A)
    return (per.mean(1) * w).sum() / w.sum()


def train_epoch(model, opt, batches, steps, lr_at, device, prec, augment, mixup_alpha=None,
                channels_last=False, fused_copies=False, desc=None) -> torch.Tensor:
    """Run up to ``steps`` optimiser steps over ``batches`` of (x, y (B,), w (B,), n_labeled).

    ``augment(x, n_labeled)`` returns the (B, A, C, H, W) augmented copies on the device (identity
    when the loader already augmented on the CPU); the loss is :func:`copies_loss`, with mixup (one
    Beta(alpha, alpha) lambda and one permutation per batch, shared by the copies) when
    ``mixup_alpha`` is given. ``lr_at(step)`` sets the rate. ``desc``: progress-bar title (None: no
    bar). Returns the per-step losses (steps run,) on device.
    """
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=desc is None, leave=False)
    for step, (x, y, w, n_lab) in zip(range(steps), batches):
        x, y, w = (v.to(device, non_blocking=True) for v in (x, y, w))
        x = augment(x, n_lab)                                    # (B, A, C, H, W)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        lam, perm = mixup_batch(x.shape[0], mixup_alpha, device) if mixup_alpha else (1.0, None)
        if perm is not None:
            x = lam * x + (1 - lam) * x[perm]
        loss = copies_loss(model, x, y, w, lam, perm, prec, channels_last, fused_copies)
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
        losses.append(loss.detach())
        bar.update()
        if desc is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return torch.stack(losses) if losses else torch.zeros(0, device=device)


# ============ the recipe ============
class Trainer:
    """One run of train_ssl.py: the pieces every step of :func:`train_ssl` shares."""

    def __init__(self, cfg, data: SSLData, info, device):
        self.cfg, self.data, self.info, self.device = cfg, data, info, device
        self.main = info.is_main
        self.sched = make_schedule(cfg, len(data.lab_idx), len(data.unl_idx))
        seed_everything(derive_seed(cfg.seed, "init"))
        self.model = build_classifier(cfg, data.spec)       # an --init error surfaces here
        self.init_state = copy.deepcopy(self.model.state_dict()) if cfg.t_search else None
        weak, strong, copies, self.augment = make_augmentation(cfg, data.spec, device)
        self.weak_strong = (weak, strong, copies)
        self.prec = Precision(cfg.amp, device)
        try:
            self.backend = resolve_backend(cfg.knn_backend, device)
        except ValueError as e:
            raise UserError(f"--knn-backend: {e}") from None

    def open(self, run: RunDir):
        """Model to device, optimiser, loaders, TensorBoard; resume from ``last.pt`` if there is one."""
        cfg, info, device = self.cfg, self.info, self.device
        self.run = run
        self.model, _ = prepare_model(self.model, cfg, device)
        self.fwd = wrap_ddp(self.model, info, device)
        self.fwd = torch.compile(self.fwd) if cfg.compile else self.fwd
        self.opt = make_optimizer(cfg, self.model)
        self.loaders = Loaders(cfg, self.data, self.sched, info, device, *self.weak_strong)
        self.use_streams(cfg.seed)
        self.history, self.start, self.searched = [], 0, None
        ckpt = run.resume_state()
        if ckpt:
            if not np.array_equal(np.asarray(ckpt["labeled"]), self.data.lab_idx):
                raise UserError("the labeled set differs from the one this run started with; "
                                "pass --fresh to start over")
            load_state(self.model, ckpt["model"], f"run checkpoint {run.last}")
            self.opt.load_state_dict(ckpt["optimizer"])
            self.history, self.start, self.searched = ckpt["history"], ckpt["epoch"], ckpt["t_search"]
        self.writer = run.writer(purge_step=self.start)

    def use_streams(self, seed: int) -> None:
        """Draw the epochs' data order, augmentations and mixup from ``seed``: the run's seed, or a
        t-search phase's own (so the phases are independent runs, as published)."""
        self.stream_seed = seed
        self.loaders.lab_stream.seed = self.loaders.unl_stream.seed = seed

    def epoch_losses(self, epoch: int, desc: str) -> torch.Tensor:
        """Train one epoch of the schedule (graph step first in semi-supervised epochs)."""
        cfg, sched, data, loaders = self.cfg, self.sched, self.data, self.loaders
        seed_everything(derive_seed(self.stream_seed, "epoch", epoch, self.info.rank))  # replay on resume
        self.stats = {}
        if sched.phase(epoch) == "sup" or cfg.supervised_only:
            batches = loaders.labeled_batches(epoch, data.targets)
            mixup = cfg.mixup
        else:
            pseudo, weight = self.graph_step()
            batches = loaders.composite_batches(epoch, data.targets, pseudo, weight)
            mixup = cfg.ssl_mixup
        return train_epoch(self.fwd, self.opt, batches, sched.steps(epoch),
                           lambda step: sched.lr(cfg.lr, epoch, step), self.device, self.prec,
                           self.augment, cfg.mixup_alpha if mixup else None, cfg.channels_last,
                           cfg.fused_copies, desc if cfg.progress and self.main else None)

    def graph_step(self):
        """Features of every training image, propagation on rank 0, pseudo-labels shared."""
        cfg, data, info = self.cfg, self.data, self.info
        _, feats = predict(self.model, self.loaders.eval_train, self.device, cfg.progress and self.main,
                           "features")
        feats = gather_rows(feats, torch.as_tensor(self.loaders.my_rows), len(data.train), info)
        shared = None
        if self.main:
            is_lab = np.zeros(len(data.train), bool)
            is_lab[data.lab_idx] = True
            # the true labels of unlabeled points only feed propagate's accuracy report
            res = propagate(feats.numpy(), data.train.targets, is_lab, data.spec.num_classes, k=cfg.knn,
                            alpha=cfg.alpha, max_iter=cfg.cg_max_iter, tol=cfg.cg_tol,
                            align_steps=cfg.align_steps, align_clip=cfg.align_clip,
                            knn_backend=cfg.knn_backend, device=self.device)
            shared = (res.pseudo_labels, res.weights,
                      {"pseudo_label_acc": res.acc_after_align,
                       "pseudo_label_acc_before_align": res.acc_before_align,
                       "graph_time": res.timings["total"], "cg_iters": res.cg_iters,
                       "cg_residual": res.cg_residual})
        pseudo, weight, self.stats = broadcast_object(shared, info)
        weight = torch.as_tensor(weight) if cfg.use_weights else torch.ones(len(data.train))
        return torch.as_tensor(pseudo), weight

    def entry(self, epoch: int, losses: torch.Tensor, seconds: float) -> dict:
        """Describe one finished epoch, evaluated every --eval-every epochs and at the end (rank 0)."""
        last_of = self.sched.sup_rounds if epoch < self.sched.sup_rounds and self.cfg.t_search else self.sched.stop
        if (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == last_of:
            top1, top5 = evaluate(self.model, self.loaders.eval_test, self.data.test.targets, self.device,
                                  self.cfg.progress)
        else:
            top1 = top5 = None
        last = self.sched.steps(epoch) - 1
        return {"epoch": epoch + 1, "phase": self.sched.phase(epoch), "test_top1": top1, "test_top5": top5,
                "loss": float(losses.mean()) if len(losses) else float("nan"),
                "lr": self.sched.lr(self.cfg.lr, epoch, last), "t": current_t(self.model),
                "time": seconds, **self.stats}

    def record(self, entry: dict) -> None:
        """History, TensorBoard, metrics.json, last.pt (atomic), one log line (rank 0)."""
        self.history.append(entry)
        step = entry["epoch"]
        for k in ("loss", "lr", "test_top1", "test_top5", "pseudo_label_acc",
                  "pseudo_label_acc_before_align", "t", "graph_time", "cg_iters", "cg_residual"):
            if entry.get(k) is not None:
                tag = {"loss": "train/loss", "lr": "train/lr", "t": "train/t"}.get(k, f"eval/{k}")
                self.writer.add_scalar(tag, entry[k], step)
        self.writer.add_scalar("time/epoch_seconds", entry["time"], step)
        self.writer.flush()
        self.save(step)
        self.run.write_metrics(summarize(self.history, self.sched, self.cfg.seed, self.searched, self.data.eval_kind))
        log.info(f"epoch {step}/{self.sched.stop} [{entry['phase']}] loss {entry['loss']:.4f}"
                 + (f" top1 {entry['test_top1']:.2f} top5 {entry['test_top5']:.2f}"
                    if entry["test_top1"] is not None else "")
                 + (f" pl_acc {entry['pseudo_label_acc']:.2f}" if entry.get("pseudo_label_acc") is not None
                    else "")
                 + (f" t {entry['t']:.3f}" if entry["t"] is not None else "") + f" ({entry['time']:.1f}s)")

    def save(self, epoch: int) -> None:
        self.run.save({"epoch": epoch, "model": self.model.state_dict(),
                       "classifier": classifier_record(self.model), "optimizer": self.opt.state_dict(),
                       "history": self.history, "labeled": self.data.lab_idx.tolist(),
                       "t_search": self.searched})

    def t_search(self) -> None:
        """Table 3's t-search as published: from the --init weights, one supervised phase (all the
        supervised rounds, a fresh optimiser, its own data order, augmentations and mixup draws,
        seeded by (seed, phase)) at each t of ``T_SEARCH_VALUES``; the phase whose
        rounds reached the lowest training loss (a round's loss: the mean over its last pass) goes
        on from its final weights. ``last.pt`` keeps the best phase so far after every phase."""
        cfg, sched = self.cfg, self.sched
        searched = self.searched or {"phases": [], "chosen": None}
        best_state = copy.deepcopy(self.model.state_dict()) if searched["phases"] else None
        for i, t in enumerate(T_SEARCH_VALUES):
            if i < len(searched["phases"]):
                continue
            self.model.load_state_dict(self.init_state)
            self.model.set_t(t)
            self.use_streams(derive_seed(cfg.seed, "t-search", i))
            self.opt = make_optimizer(cfg, self.model)
            phase = {"t": t, "losses": [], "entries": []}
            for epoch in range(sched.sup_rounds):
                t0 = time.time()
                losses = self.epoch_losses(epoch, f"t-search t={t:.2f} round {epoch + 1}")
                phase["losses"].append(float(all_reduce_mean(losses[-sched.pass_steps:].mean(), self.info)))
                if self.main:
                    phase["entries"].append(self.entry(epoch, losses, time.time() - t0))
                    self.writer.add_scalar(f"t_search/loss_t{t:.2f}", phase["losses"][-1], epoch + 1)
            searched["phases"].append(phase)
            scores = [min(p["losses"]) for p in searched["phases"]]
            if best_state is None or int(np.argmin(scores)) == i:
                best_state = copy.deepcopy(self.model.state_dict())
            self.searched = searched
            if self.main:
                log.info(f"t-search: t={t:.2f} lowest loss {min(phase['losses']):.4f}")
                self.run.save({"epoch": 0, "model": best_state, "classifier": classifier_record(self.model),
                               "optimizer": self.opt.state_dict(), "history": [],
                               "labeled": self.data.lab_idx.tolist(), "t_search": searched})
            barrier(self.info)
        self.use_streams(cfg.seed)
        searched["chosen"] = int(np.argmin([min(p["losses"]) for p in searched["phases"]]))
        self.model.load_state_dict(best_state)
        self.searched = searched

    def close(self):
        self.writer.close()


def print_config(cfg, sched: Schedule, data: SSLData) -> None:
    print(yaml.safe_dump(C.to_dict(cfg), sort_keys=True).rstrip())
    print(yaml.safe_dump({"schedule": {"labeled": len(data.lab_idx), "unlabeled": len(data.unl_idx),
                                       **sched.summary(cfg.lr)}}, sort_keys=False).rstrip())


def train_ssl(cfg: C.SSLConfig) -> dict:
    # ============ set-up and data: every input error before anything is written ============
    info, device = init_distributed(cfg.device)
    ws = info.world_size
    if cfg.batch_size % ws or cfg.labeled_batch_size % ws:
        raise UserError(f"--batch-size {cfg.batch_size} and --labeled-batch-size "
                        f"{cfg.labeled_batch_size} must be divisible by the {ws} processes")
    data = load_data(cfg)
    trainer = Trainer(cfg, data, info, device)
    sched = trainer.sched
    if cfg.print_config:
        if info.is_main:
            print_config(cfg, sched, data)
        return {"schedule": sched.summary(cfg.lr)}

    # ============ run dir, model, resume ============
    lab_part = f"file-{cfg.label_file.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" if cfg.label_file \
        else f"l{cfg.labels}"
    run = RunDir(cfg, SSL_RUN, run_name("ssl", cfg, [cfg.dataset, lab_part, f"s{cfg.seed}",
                                                     "sup" if cfg.supervised_only else "",
                                                     "mixup" if cfg.mixup else "",
                                                     "drl" if cfg.init else ""]), info.is_main)
    barrier(info)
    trainer.open(run)
    if info.is_main:
        write_label_file(run.path / "labeled.txt", data.train, data.lab_idx)
    run.write_config()
    start = trainer.start
    faiss_gpus = faiss_gpu_count()
    log.info(f"device={device} processes={ws} dataset={cfg.dataset} (from {cfg.dataset_source}) "
             f"train={len(data.train)} {data.eval_kind}={len(data.test)} classes={data.spec.num_classes} "
             f"labeled={len(data.lab_idx)} unlabeled={len(data.unl_idx)} "
             f"loader_workers={trainer.loaders.workers} "
             f"faiss_gpus={'n/a' if faiss_gpus is None else faiss_gpus} knn_backend={trainer.backend} "
             f"epochs={sched.stop} of {sched.total} ({sched.sup_rounds} supervised + {sched.ssl_epochs}) "
             f"t={current_t(trainer.model)} run_dir={run.path}"
             + (f" resuming after epoch {start}" if start else ""))
    if start >= sched.stop:
        log.info("run already finished; nothing to do (pass --fresh to start over)")

    # ============ t-search (Table 3), then the epoch loop ============
    if cfg.t_search and start < sched.sup_rounds:
        start = run_t_search(trainer)
    for epoch in range(start, sched.stop):
        t0 = time.time()
        losses = trainer.epoch_losses(epoch, f"epoch {epoch + 1}/{sched.stop} {sched.phase(epoch)}")
        mean = losses.mean().float() if len(losses) else torch.zeros((), device=device)
        check_finite(float(all_reduce_mean(mean, info)), f"training loss in epoch {epoch + 1}", run.path)
        if info.is_main:       # rank 0 evaluates, logs and saves; the others wait for it
            trainer.record(trainer.entry(epoch, losses, time.time() - t0))
        barrier(info)

    # ============ record ============
    trainer.close()
    metrics = summarize(trainer.history, sched, cfg.seed, trainer.searched, data.eval_kind)
    if info.is_main and trainer.history:
        run.write_metrics(metrics)
        log.info(f"final {data.eval_kind} top-1 {metrics['test_top1']:.2f}% (best {metrics['test_top1_best']:.2f}%, "
                 f"mean of last 5 {metrics['test_top1_last5']:.2f}%) -> {run.path / 'metrics.json'}")
    cleanup(info)
    return metrics


def run_t_search(trainer: Trainer) -> int:
    """Run (or finish) the t-search and go on from the chosen phase; returns the next epoch."""
    trainer.t_search()
    chosen = trainer.searched["phases"][trainer.searched["chosen"]]
    log.info(f"t-search: lowest losses {[round(min(p['losses']), 4) for p in trainer.searched['phases']]}; "
             f"going on from t={chosen['t']:.2f}")
    trainer.history = list(chosen["entries"])
    trainer.opt = make_optimizer(trainer.cfg, trainer.model)     # published: a fresh optimiser
    if trainer.main:
        trainer.save(trainer.sched.sup_rounds)
    return trainer.sched.sup_rounds


def summarize(history: list, sched: Schedule, seed: int, searched=None, eval_set: str = "test") -> dict:
    """metrics.json: the headline numbers first, the full history last. ``eval_set``: what the
    ``test_*`` numbers were measured on ("test", or "validation" with --val-images)."""
    last = history[-1] if history else {}
    top1 = [h["test_top1"] for h in history if h["test_top1"] is not None]
    pl = [h.get("pseudo_label_acc") for h in history if h.get("pseudo_label_acc") is not None]
    chosen = searched.get("chosen") if searched else None
    return {"test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"),
            "test_top1_best": max(top1) if top1 else None,
            "test_top1_last5": float(np.mean(top1[-5:])) if top1 else None,
            "eval_set": eval_set, "pseudo_label_acc": pl[-1] if pl else None, "t": last.get("t"),
            "epochs_done": len(history), "epochs_total": sched.stop, "epochs_scheduled": sched.total,
            "seed": seed,
            "t_search": None if not searched else {
                "t": [p["t"] for p in searched["phases"]],
                "lowest_loss": [min(p["losses"]) for p in searched["phases"]],
                "phase_losses": [p["losses"] for p in searched["phases"]],
                "chosen_t": None if chosen is None else searched["phases"][chosen]["t"]},
            "history": history}
