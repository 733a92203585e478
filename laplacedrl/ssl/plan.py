"""What ``train_ssl.py --print-config`` shows: the resolved config, the run dir and the schedule.

With the data present the schedule is exact; without it, the published image counts give it for the
datasets that have them, and for your own images it is given per pass over the labeled and the
unlabeled images.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from laplacedrl import config as C
from laplacedrl.registry import published
from laplacedrl.engine.run import run_name
from laplacedrl.errors import UserError
from laplacedrl.ssl.schedule import Schedule, fit_to_data, make_schedule


def default_run_name(cfg) -> str:
    lab_part = f"file-{cfg.label_file.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" if cfg.label_file \
        else f"l{cfg.labels}"
    return run_name("ssl", cfg, [cfg.dataset, lab_part, f"s{cfg.seed}", "sup" if cfg.supervised_only else "",
                                 "mixup" if cfg.mixup else "", "drl" if cfg.init else ""])


def print_plan(cfg, sched: Schedule | None, counts: dict, note: str = "") -> dict:
    """``--print-config``: the resolved config, the run dir and the schedule (per pass over the
    labeled / unlabeled images where the image counts are not known)."""
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
    return {"schedule": plan, "run_dir": out}


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
