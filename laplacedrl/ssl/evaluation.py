"""Evaluation of a classifier: logits and features of a loader, top-k accuracy, metrics.json."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from laplacedrl.ssl.tsearch import search_record


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list:
    """Number of rows whose label is among the top-k logits, for each k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == y[:, None]
    return [int(hit[:, :k].any(1).sum()) for k in ks]


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
    """(top-1 %, top-5 %) of ``model`` on an eval loader whose images have ``targets``."""
    logits, _ = predict(model, loader, device, progress, "eval")
    c1, c5 = topk_correct(logits, torch.as_tensor(targets))
    return 100.0 * c1 / len(targets), 100.0 * c5 / len(targets)


def summarize(history: list, sched, seed: int, searched=None, eval_set: str = "test") -> dict:
    """metrics.json of a run from its ``history`` (one entry per epoch) and its :class:`Schedule`: the
    headline numbers first, the full history last. ``eval_set``: what the ``test_*`` numbers were
    measured on ("test", or "validation" with --val-images); ``searched``: the t-search record."""
    last = history[-1] if history else {}
    top1 = [h["test_top1"] for h in history if h["test_top1"] is not None]
    pl = [h.get("pseudo_label_acc") for h in history if h.get("pseudo_label_acc") is not None]
    return {"test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"),
            "test_top1_best": max(top1) if top1 else None,
            "test_top1_last5": float(np.mean(top1[-5:])) if top1 else None,
            "eval_set": eval_set, "pseudo_label_acc": pl[-1] if pl else None, "t": last.get("t"),
            "epochs_done": len(history), "epochs_total": sched.stop, "epochs_scheduled": sched.total,
            "seed": seed,
            "t_search": search_record(searched),
            "history": history}


class Predictor(torch.nn.Module):
    """Images (B, C, S, S) with values in [0, 1] -> class probabilities (B, classes): the input
    normalisation and the classifier in one module (what ``evaluate --export`` exports)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model((images - self.mean) / self.std)
        return torch.softmax(logits.float(), dim=1)
