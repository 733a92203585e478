"""The graph step of a semi-supervised epoch: features of every training image -> pseudo-labels.

Each rank embeds its share of the training images (eval transform), rank 0 gathers them in dataset
order and runs :func:`laplacedrl.graph.propagate`, and the pseudo-labels and weights are broadcast.
``propagate`` is handed -1 for every unlabeled image, so no label it should not know can reach it;
the pseudo-label accuracy is measured here, against the true labels where the dataset has them,
for the log only.
"""
from __future__ import annotations

import numpy as np
import torch

from laplacedrl.engine.distributed import broadcast_object, gather_rows
from laplacedrl.graph import propagate
from laplacedrl.ssl.evaluation import predict


def accuracy_on_unlabeled(pred: np.ndarray, data) -> float | None:
    """Percent of the unlabeled images whose prediction is their true label; None when none of them
    has a known label (your own unlabeled images)."""
    truth = np.asarray(data.train.targets)[data.unl_idx]
    known = truth >= 0
    return float(100.0 * np.mean(pred[data.unl_idx][known] == truth[known])) if known.any() else None


def graph_step(model, loaders, data, cfg, info, device, progress=False):
    """Pseudo-labels for a semi-supervised epoch -> ``(pseudo (N,), weight (N,), stats)``.

    ``weight`` is 1 everywhere unless ``cfg.use_weights`` (then LaplaceNet's 1 - H/log C); ``stats``
    holds the pseudo-label accuracy before and after the distribution alignment, the graph's time and
    the CG iterations and residual (the same dict on every rank).
    """
    _, feats = predict(model, loaders.eval_train, device, progress, "features")
    feats = gather_rows(feats, torch.as_tensor(loaders.my_rows), len(data.train), info)
    shared = None
    if info.is_main:
        visible = data.visible_labels()
        res = propagate(feats.numpy(), visible, visible >= 0, data.spec.num_classes, k=cfg.knn,
                        alpha=cfg.alpha, max_iter=cfg.cg_max_iter, tol=cfg.cg_tol,
                        align_steps=cfg.align_steps, align_clip=cfg.align_clip,
                        knn_backend=cfg.knn_backend, device=device)
        stats = {"pseudo_label_acc": accuracy_on_unlabeled(res.pseudo_labels, data),
                 "pseudo_label_acc_before_align": accuracy_on_unlabeled(res.labels_before_align, data),
                 "graph_time": res.timings["total"], "cg_iters": res.cg_iters,
                 "cg_residual": res.cg_residual}
        shared = (res.pseudo_labels, res.weights, stats)
    pseudo, weight, stats = broadcast_object(shared, info)
    weight = torch.as_tensor(weight) if cfg.use_weights else torch.ones(len(data.train))
    return torch.as_tensor(pseudo), weight, stats
