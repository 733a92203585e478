"""What ``train_ssl.py --print-config`` shows: the resolved config, the run dir and the schedule.

With the data present the schedule is exact; without it, the published image counts give it for the
datasets that have them, and for your own images it is given per pass over the labeled and the
unlabeled images. With the data, :func:`estimate` times a few steps of each kind on this machine
for the estimated wall time.
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from laplacedrl import config as C
from laplacedrl.registry import published
from laplacedrl.engine.run import run_name
from laplacedrl.engine.timing import format_duration, time_steps, timed_here
from laplacedrl.errors import UserError
from laplacedrl.ssl.schedule import Schedule, fit_to_data, make_schedule


def default_run_name(cfg) -> str:
    lab_part = f"file-{cfg.label_file.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" if cfg.label_file \
        else f"l{cfg.labels}"
    return run_name("ssl", cfg, [cfg.dataset, lab_part, f"s{cfg.seed}", "sup" if cfg.supervised_only else "",
                                 "mixup" if cfg.mixup else "", "drl" if cfg.init else ""])


def print_plan(cfg, sched: Schedule | None, counts: dict, note: str = "", estimate: dict | None = None) -> dict:
    """``--print-config``: the resolved config, the run dir and the schedule (per pass over the
    labeled / unlabeled images where the image counts are not known), and the estimated wall time
    (:func:`estimate`; None: unknown, the data is not there)."""
    if sched is not None:
        plan = {**counts, **sched.summary(cfg.lr)}
    else:
        plan = {"supervised": f"{cfg.sup_rounds} rounds x {cfg.sup_passes} passes over the labeled images",
                "semi_supervised": f"{cfg.epochs} epochs, each one pass over the unlabeled images" if cfg.epochs
                else f"as many epochs as {cfg.num_steps} steps allow (it depends on the image counts)"}
    unresolved = 0 in (cfg.knn, cfg.batch_size, cfg.labeled_batch_size)
    out = cfg.out or ("(named once the data is there: its sizes are part of the config)" if unresolved
                      else str(Path("runs") / default_run_name(cfg)))
    print(C.to_yaml(cfg, out=out).rstrip())
    print(yaml.safe_dump({"schedule": plan}, sort_keys=False).rstrip())
    if note:
        print(f"# {note}")
    if estimate is None:
        print("# estimated wall time: unknown (it is timed on the data, which is not there)")
    else:
        print(f"# estimated wall time: {format_duration(estimate['seconds'])} ({estimate['how']})")
    return {"schedule": plan, "run_dir": out, "seconds": None if estimate is None else estimate["seconds"]}


def plan_without_data(cfg, err: UserError) -> dict:
    """--print-config when the data is not there: the published image counts where they are known."""
    known = published(cfg.dataset)
    if known is None or cfg.label_file:
        return print_plan(cfg, None, {}, f"the data is not there ({err}); the schedule per pass")
    n_train = cfg.train_subset or known[0] - cfg.val_images
    n_lab = n_train if cfg.labels == 0 else cfg.labels
    cfg = fit_to_data(cfg, n_train, n_lab, n_train - n_lab)
    sched = make_schedule(cfg, n_lab, n_train - n_lab)
    return print_plan(cfg, sched, {"labeled": n_lab, "unlabeled": n_train - n_lab},
                      f"the data is not there ({err}); counts from the dataset as published")


def _again(make):
    """Batches of ``make()``, made again whenever they run out (an epoch may be shorter than the timing)."""
    while True:
        yield from make()


def estimate(cfg, data, sched: Schedule, model, weak_strong, augment, prec, info, device) -> dict:
    """The run's wall time on this machine: a few timed steps of each kind, times how many the
    schedule has -> ``{"seconds", "how"}`` (seconds None if a step cannot run here).

    Supervised and semi-supervised steps (real batches, augmented in this process; random
    pseudo-labels), the forward pass of one evaluation batch (for the graph step's features and the
    evaluations), and one propagation over random features of the training set's size. ``model``
    is copied, not trained.
    """
    import copy

    import torch

    from laplacedrl.engine.run import prepare_model
    from laplacedrl.graph import propagate
    from laplacedrl.ssl.epoch import train_epoch
    from laplacedrl.ssl.loaders import Loaders
    from laplacedrl.ssl.model import make_optimizer
    from laplacedrl.ssl.tsearch import T_SEARCH_VALUES
    model = prepare_model(copy.deepcopy(model), cfg, device)
    opt = make_optimizer(cfg, model)
    loaders = Loaders(C.replace(cfg, num_workers=0), data, sched, info, device, *weak_strong)
    n_train, n_eval, ssl_epoch = len(data.train), len(data.test), sched.sup_rounds
    pseudo = torch.randint(0, data.spec.num_classes, (n_train,))

    def stepper(batches, epoch, mixup):
        def step():
            train_epoch(model, opt, batches, 1, lambda _: sched.lr(cfg.lr, epoch, 0), device, prec, augment,
                        mixup_alpha=cfg.mixup_alpha if mixup else None, channels_last=cfg.channels_last,
                        fused_copies=cfg.fused_copies)
        return step

    sup = time_steps(stepper(_again(lambda: loaders.labeled_batches(0, data.targets)), 0, cfg.mixup))
    ssl = sup if cfg.supervised_only else time_steps(stepper(_again(lambda: loaders.composite_batches(
        ssl_epoch, data.targets, pseudo, torch.ones(n_train))), ssl_epoch, cfg.ssl_mixup))
    images = _again(lambda: loaders.eval_train)
    dim = []

    def forward():
        model.eval()
        with torch.no_grad():
            _, feats = model(next(images)[0][:, 0].to(device))
        dim[:] = [feats.shape[1]]
    per_image = time_steps(forward)
    loaders.close()
    if None in (sup, ssl, per_image):
        return {"seconds": None, "how": "a step failed here"}
    per_image /= min(cfg.eval_batch_size, n_train)
    graph = 0.0
    if not cfg.supervised_only and sched.stop > sched.sup_rounds:
        feats = torch.nn.functional.normalize(torch.randn(n_train, dim[0]), dim=1).numpy()
        labels = data.visible_labels()
        t0 = time.perf_counter()
        propagate(feats, labels, labels >= 0, data.spec.num_classes, k=cfg.knn, alpha=cfg.alpha,
                  max_iter=cfg.cg_max_iter, tol=cfg.cg_tol, align_steps=cfg.align_steps,
                  align_clip=cfg.align_clip, knn_backend=cfg.knn_backend, device=device)
        graph = time.perf_counter() - t0 + n_train * per_image
    epochs = range(sched.stop)
    sup_steps = sum(sched.steps(e) for e in epochs if sched.phase(e) == "sup")
    sup_steps *= len(T_SEARCH_VALUES) if cfg.t_search else 1
    ssl_steps = sum(sched.steps(e) for e in epochs if sched.phase(e) == "ssl")
    graphs = 0 if cfg.supervised_only else sched.stop - min(sched.stop, sched.sup_rounds)
    evals = 0 if data.eval_kind == "none" else sum(
        1 for e in epochs if (e + 1) % cfg.eval_every == 0 or e + 1 == sched.stop)
    seconds = sup_steps * sup + ssl_steps * ssl + graphs * graph + evals * n_eval * per_image
    how = (f"{sup_steps} supervised steps x {sup:.3f} s, {ssl_steps} semi-supervised x {ssl:.3f} s, "
           f"{graphs} graph steps x {graph:.2f} s, {evals} evaluations x {n_eval * per_image:.2f} s; "
           f"{timed_here()}")
    return {"seconds": seconds, "how": how}
