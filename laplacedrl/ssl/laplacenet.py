"""The LaplaceNet loop (see LAPLACENET.md): supervised rounds, then graph pseudo-labels + one epoch each.

The schedule is a list of epochs: ``sup_rounds`` supervised rounds (each ``sup_passes`` passes over
the labeled images), then ``epochs`` semi-supervised epochs. Every epoch ends with an evaluation, a
``metrics.json`` and an atomic ``last.pt``, so a killed run resumes at the next epoch boundary and
re-running a finished command does nothing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from laplacedrl import config as C
from laplacedrl.data import (AugmentedSubset, balanced_split, load_dataset, make_transform,
                             read_label_file, write_label_file)
from laplacedrl.engine.checkpoint import SSL_FORMAT, load_state
from laplacedrl.engine.distributed import (all_reduce_mean, barrier, broadcast_object, cleanup,
                                           epoch_shard, gather_rows, init_distributed, shard,
                                           wrap_ddp)
from laplacedrl.engine.run import (Precision, RunDir, check_finite, log, prepare_model, run_name,
                                   seed_everything)
from laplacedrl.errors import UserError
from laplacedrl.graph import propagate
from laplacedrl.graph.knn import faiss_gpu_count, resolve_backend
from laplacedrl.models import build_model
from laplacedrl.pretrained import load_pretrained_classifier
from laplacedrl.ssl.mixup import mixup_batch, mixup_cross_entropy


# ============ pure pieces ============
def cosine_lr(base_lr: float, epoch: float, total_epochs: int) -> float:
    """LaplaceNet's rampdown: ``lr * (cos(pi * epoch / (total + 10)) + 1) / 2``, ``epoch`` fractional."""
    return base_lr * 0.5 * (math.cos(math.pi * epoch / (total_epochs + 10)) + 1.0)


def epochs_from_steps(num_steps: int, sup_steps: int, ssl_steps: int) -> int:
    """Semi-supervised epochs that fit a total step budget after the supervised phase."""
    return max(0, (num_steps - sup_steps) // max(ssl_steps, 1))


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list:
    """Number of rows whose label is among the top-k logits, for each k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == y[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


@dataclass
class Schedule:
    sup_rounds: int
    sup_steps: int     # optimiser steps of one supervised round
    ssl_epochs: int
    ssl_steps: int     # optimiser steps of one semi-supervised epoch

    @property
    def total(self) -> int:
        return self.sup_rounds + self.ssl_epochs

    def phase(self, epoch: int) -> str:
        return "sup" if epoch < self.sup_rounds else "ssl"

    def steps(self, epoch: int) -> int:
        return self.sup_steps if self.phase(epoch) == "sup" else self.ssl_steps


# ============ data ============
def _loader(ds, batch_size, cfg, seed=0, shuffle=False, drop_last=False, sampler=None):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      sampler=sampler, num_workers=cfg.num_workers, generator=g,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def endless(make_loader):
    """Yield batches forever from ``make_loader(pass_index)``, a freshly shuffled loader per pass."""
    i = 0
    while True:
        yield from make_loader(i)
        i += 1


def labeled_indices(cfg, train, spec, prev=None) -> np.ndarray:
    if cfg.label_file:
        idx = read_label_file(cfg.label_file, train)
    else:
        idx = balanced_split(train.targets, cfg.labels, spec.num_classes, cfg.seed)
    if prev is not None and not np.array_equal(np.asarray(prev), idx):
        raise UserError("the labeled set differs from the one this run started with; "
                        "pass --fresh to start over")
    return idx


def make_augmentation(cfg, spec, device):
    """Where the aug_num copies are made: by PIL in the loader, or batched on the training device.

    Returns (weak transform, strong transform, copies per loader item, augment(x, n_labeled)):
    the loop calls ``augment`` on each device batch to get (B, A, C, H, W).
    """
    on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and device.type == "cuda")
    if not on_device:
        return (make_transform(spec, "weak", cfg.ra_weak, cfg.ra_magnitude),
                make_transform(spec, "strong", cfg.ra_strong, cfg.ra_magnitude), cfg.aug_num,
                lambda x, n_lab: x)
    from laplacedrl.data.gpu_augment import BatchAugment, raw_transform
    weak = BatchAugment(spec, "weak", cfg.ra_weak, cfg.ra_magnitude).to(device)
    strong = BatchAugment(spec, "strong", cfg.ra_strong, cfg.ra_magnitude).to(device)

    def augment(x, n_lab):
        x = x[:, 0]                                                  # (B, C, H, W) in [0, 1]
        return torch.stack([torch.cat([weak(x[:n_lab]), strong(x[n_lab:])])
                            for _ in range(cfg.aug_num)], dim=1)
    return raw_transform(spec), raw_transform(spec), 1, augment


# ============ model ============
def build_classifier(cfg, spec):
    """Plain LaplaceNet WRN, or the DRL encoder with learnable t when ``--init`` is given."""
    if cfg.init:
        return load_pretrained_classifier(cfg.init, spec, cfg.t_init, trainable=not cfg.freeze_t)
    return build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size)


def current_t(model):
    return float(model.t.detach()) if hasattr(model, "t") else None


def make_optimizer(cfg, model):
    """SGD (Nesterov); the learnable t (if any) gets no weight decay."""
    t_params = [p for n, p in model.named_parameters() if n == "t_logit" and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if n != "t_logit" and p.requires_grad]
    groups = [{"params": rest}] + ([{"params": t_params, "weight_decay": 0.0}] if t_params else [])
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
def train_epoch(model, opt, batches, steps, cfg, lr_at, device, prec, augment, desc=None) -> float:
    """Run ``steps`` optimiser steps over ``batches`` of (x, y (B,), w (B,), n_labeled).

    ``augment(x, n_labeled)`` returns the (B, A, C, H, W) augmented copies on the device (identity
    when the loader already augmented on the CPU). Loss: cross-entropy averaged over the A copies,
    weighted per sample by w, with mixup (one lambda and one permutation per batch, shared by the
    copies) when ``cfg.mixup``. ``desc``: progress-bar title (None: no bar). Returns the mean loss.
    """
    model.train()
    total = torch.zeros((), device=device)
    bar = tqdm(range(steps), desc=desc, disable=desc is None, leave=False)
    for step in bar:
        x, y, w, n_lab = next(batches)
        x, y, w = (v.to(device, non_blocking=True) for v in (x, y, w))
        x = augment(x, n_lab)                                    # (B, A, C, H, W)
        b, a = x.shape[:2]
        for g in opt.param_groups:
            g["lr"] = lr_at(step / steps)
        lam, perm = mixup_batch(b, cfg.mixup_alpha, device) if cfg.mixup else (1.0, None)
        if perm is not None:
            x = lam * x + (1 - lam) * x[perm]
        x = x.flatten(0, 1)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with prec.autocast():
            logits, _ = model(x)                                 # (B*A, C)
        per = mixup_cross_entropy(logits.float().view(b, a, -1), y, lam, perm)   # (B, A)
        loss = (per.mean(1) * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
        total += loss.detach()
        if desc is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return float(total) / max(steps, 1)


def t_search(model, loader, targets, device) -> dict:
    """Table 3's t-search: labeled-set loss at 11 values of t in [0.001, 1]; keeps the best t."""
    losses = {}
    y = torch.as_tensor(targets)
    for t in np.linspace(0.001, 1.0, 11):
        model.set_t(float(t))
        logits, _ = predict(model, loader, device)
        losses[round(float(t), 4)] = float(F.cross_entropy(logits, y))
    best = min(losses, key=losses.get)
    model.set_t(best)
    return losses


# ============ the recipe ============
def train_ssl(cfg: C.SSLConfig) -> dict:
    info, device = init_distributed(cfg.device)
    ws, main = info.world_size, info.is_main
    if cfg.batch_size % ws or cfg.labeled_batch_size % ws:
        raise UserError(f"--batch-size {cfg.batch_size} and --labeled-batch-size "
                        f"{cfg.labeled_batch_size} must be divisible by the {ws} processes")
    seed_everything(cfg.seed)

    # ============ data and labels ============
    train, test, spec = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    lab_part = f"file-{cfg.label_file.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" if cfg.label_file \
        else f"l{cfg.labels}"
    run = RunDir(cfg, SSL_FORMAT, run_name("ssl", cfg, [cfg.dataset, lab_part, f"s{cfg.seed}",
                                                      "sup" if cfg.supervised_only else "",
                                                      "mixup" if cfg.mixup else "",
                                                      "drl" if cfg.init else ""]), main)
    barrier(info)
    ckpt = run.resume_state()
    lab_idx = labeled_indices(cfg, train, spec, ckpt["labeled"] if ckpt else None)
    is_lab = np.zeros(len(train), bool)
    is_lab[lab_idx] = True
    unl_idx = np.flatnonzero(~is_lab)
    if main:
        write_label_file(run.path / "labeled.txt", train, lab_idx)
    run.write_config()

    weak, strong, copies, augment = make_augmentation(cfg, spec, device)
    evalt = make_transform(spec, "eval")
    my_rows = shard(len(train), info)        # this rank's share of the feature extraction
    eval_train = _loader(AugmentedSubset(train, my_rows, evalt), cfg.eval_batch_size, cfg)
    eval_lab = _loader(AugmentedSubset(train, lab_idx, evalt), cfg.eval_batch_size, cfg)
    eval_test = _loader(AugmentedSubset(test, np.arange(len(test)), evalt), cfg.eval_batch_size, cfg)
    lab_bs = min(cfg.batch_size, len(lab_idx))
    unl_bs = cfg.batch_size - cfg.labeled_batch_size
    sched = Schedule(cfg.sup_rounds, cfg.sup_passes * math.ceil(len(lab_idx) / lab_bs), cfg.epochs,
                     max(1, len(unl_idx) // unl_bs))
    if cfg.num_steps:
        sched.ssl_epochs = epochs_from_steps(cfg.num_steps, sched.sup_rounds * sched.sup_steps,
                                             sched.ssl_steps)

    # ============ model, optimiser, resume ============
    model, _ = prepare_model(build_classifier(cfg, spec), cfg, device)
    fwd = wrap_ddp(model, info, device)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    prec = Precision(cfg.amp, device)
    opt = make_optimizer(cfg, model)
    history, start, searched = [], 0, None
    if ckpt:
        load_state(model, ckpt["model"], f"run checkpoint {run.last}")
        opt.load_state_dict(ckpt["optimizer"])
        history, start, searched = ckpt["history"], ckpt["epoch"], ckpt.get("t_search")
    writer = run.writer(purge_step=start)

    targets = torch.as_tensor(train.targets)
    try:
        backend = resolve_backend(cfg.knn_backend, device)
    except ValueError as e:
        raise UserError(f"--knn-backend: {e}") from None
    faiss_gpus = faiss_gpu_count()
    log.info(f"device={device} processes={ws} dataset={cfg.dataset} train={len(train)} "
             f"test={len(test)} classes={spec.num_classes} labeled={len(lab_idx)} "
             f"unlabeled={len(unl_idx)} faiss_gpus={'n/a' if faiss_gpus is None else faiss_gpus} "
             f"knn_backend={backend}"
             f" epochs={sched.total} ({sched.sup_rounds} supervised + "
             f"{sched.ssl_epochs}) t={current_t(model)} run_dir={run.path}"
             + (f" resuming after epoch {start}" if start else ""))
    if start >= sched.total:
        log.info("run already finished; nothing to do (pass --fresh to start over)")

    for epoch in range(start, sched.total):
        t0 = time.time()
        seed_everything(cfg.seed * 100_003 + epoch * 7 + info.rank)  # epochs replay on resume
        phase, steps = sched.phase(epoch), sched.steps(epoch)
        lab_step = (lab_bs if phase == "sup" else cfg.labeled_batch_size) // ws
        lab_stream = endless(lambda i: _loader(
            AugmentedSubset(train, lab_idx, weak, copies), lab_step, cfg,
            seed=cfg.seed + 7919 * epoch + 104_729 * info.rank + i, shuffle=True,
            # full labeled batches in composite steps, unless there are fewer labels than that
            drop_last=phase != "sup" and len(lab_idx) >= lab_step))
        stats = {}
        if phase == "sup" or cfg.supervised_only:
            def batches():
                for x, i in lab_stream:
                    yield x, targets[i], torch.ones(len(i)), len(i)
        else:
            # ---- graph step: features of every training image, propagate on rank 0, share ----
            _, feats = predict(model, eval_train, device, cfg.progress and main, "features")
            feats = gather_rows(feats, torch.as_tensor(my_rows), len(train), info)
            if main:
                # the true labels of unlabeled points only feed propagate's accuracy report
                res = propagate(feats.numpy(), train.targets, is_lab, spec.num_classes, k=cfg.knn,
                                alpha=cfg.alpha, max_iter=cfg.cg_max_iter, tol=cfg.cg_tol,
                                align_steps=cfg.align_steps, align_clip=cfg.align_clip,
                                knn_backend=cfg.knn_backend, device=device)
                shared = (res.pseudo_labels, res.weights,
                          {"pseudo_label_acc": res.acc_after_align,
                           "pseudo_label_acc_before_align": res.acc_before_align,
                           "graph_time": res.timings["total"], "cg_iters": res.cg_iters,
                           "cg_residual": res.cg_residual})
            pseudo, weight, stats = broadcast_object(shared if main else None, info)
            pseudo = torch.as_tensor(pseudo)
            weight = torch.as_tensor(weight) if cfg.use_weights else torch.ones(len(train))
            # every rank takes its slice of one (seed, epoch) permutation of the unlabeled set
            unl_loader = _loader(AugmentedSubset(train, unl_idx, strong, copies), unl_bs // ws, cfg,
                                 drop_last=True,
                                 sampler=epoch_shard(len(unl_idx), cfg.seed, epoch, info).tolist())

            def batches():
                for (xl, il), (xu, iu) in zip(lab_stream, unl_loader):
                    yield (torch.cat([xl, xu]), torch.cat([targets[il], pseudo[iu]]),
                           torch.cat([torch.ones(len(il)), weight[iu]]), len(il))
        loss = train_epoch(fwd, opt, iter(batches()), steps, cfg,
                           lambda frac: cosine_lr(cfg.lr, epoch + frac, sched.total), device, prec,
                           augment, f"epoch {epoch + 1}/{sched.total} {phase}"
                           if cfg.progress and main else None)
        loss = float(all_reduce_mean(torch.tensor(loss, device=device), info))
        check_finite(loss, f"training loss in epoch {epoch + 1}", run.path)
        if cfg.t_search and epoch + 1 == sched.sup_rounds and searched is None:
            searched = t_search(model, eval_lab, train.targets[lab_idx], device)
            log.info(f"t-search: losses {searched}; starting from t={current_t(model):.3f}")
        if not main:            # rank 0 evaluates, logs and saves; the others wait for it
            barrier(info)
            continue
        top1, top5 = evaluate(model, eval_test, test.targets, device, cfg.progress)

        # ---- record: history, TensorBoard, metrics.json, last.pt (atomic) ----
        entry = {"epoch": epoch + 1, "phase": phase, "test_top1": top1, "test_top5": top5,
                 "loss": loss, "lr": cosine_lr(cfg.lr, epoch + 1, sched.total),
                 "t": current_t(model), "time": time.time() - t0, **stats}
        history.append(entry)
        for k in ("loss", "lr", "test_top1", "test_top5", "pseudo_label_acc",
                  "pseudo_label_acc_before_align", "t", "graph_time", "cg_iters", "cg_residual"):
            if entry.get(k) is not None:
                tag = {"loss": "train/loss", "lr": "train/lr", "t": "train/t"}.get(k, f"eval/{k}")
                writer.add_scalar(tag, entry[k], epoch + 1)
        writer.add_scalar("time/epoch_seconds", entry["time"], epoch + 1)
        writer.flush()
        run.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                  "history": history, "labeled": lab_idx.tolist(), "t_search": searched})
        run.write_metrics(summarize(history, sched.total, cfg.seed, searched))
        log.info(f"epoch {epoch + 1}/{sched.total} [{phase}] loss {loss:.4f} top1 {top1:.2f} "
                 f"top5 {top5:.2f}" + (f" pl_acc {stats['pseudo_label_acc']:.2f}"
                                      if stats.get("pseudo_label_acc") is not None else "")
                 + (f" t {entry['t']:.3f}" if entry["t"] is not None else "")
                 + f" ({entry['time']:.1f}s)")
        barrier(info)
    writer.close()
    metrics = summarize(history, sched.total, cfg.seed, searched)
    if main and history:
        run.write_metrics(metrics)
        log.info(f"final test top-1 {metrics['test_top1']:.2f}% (best "
                 f"{metrics['test_top1_best']:.2f}%, mean of last 5 "
                 f"{metrics['test_top1_last5']:.2f}%) -> {run.path / 'metrics.json'}")
    cleanup(info)
    return metrics


def summarize(history: list, total: int, seed: int, searched=None) -> dict:
    """metrics.json: the last epoch, the best, the mean of the last five, and the full history."""
    last = history[-1] if history else {}
    top1 = [h["test_top1"] for h in history]
    pl = [h.get("pseudo_label_acc") for h in history if h.get("pseudo_label_acc") is not None]
    return {"test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"),
            "test_top1_best": max(top1) if top1 else None,
            "test_top1_last5": float(np.mean(top1[-5:])) if top1 else None,
            "pseudo_label_acc": pl[-1] if pl else None, "epochs_done": len(history),
            "epochs_total": total, "t": last.get("t"), "seed": seed, "t_search": searched,
            "history": history}
