"""Evaluate a trained classifier: test accuracy and a confusion matrix, predictions for a folder of
images, or an export that loads with torch alone.

    python -m laplacedrl.evaluate runs/digits-ssl                 # test top-1 / top-5, confusion matrix
    python -m laplacedrl.evaluate runs/digits-ssl --images my_pngs/   # predictions.csv
    python -m laplacedrl.evaluate runs/digits-ssl --export model.pt   # + model.pt2, model.json

RUN_DIR_OR_CKPT is a train_ssl.py run dir or its ``last.pt``. The test set is the run's dataset
(from its config; ``--data-dir`` overrides where it is read from; your own images: their test/
folder). Outputs go to ``--out`` (default: the run dir): ``evaluation.json``, ``confusion.csv``
(rows: true class, columns: predicted) and ``confusion.png``; or ``predictions.csv`` for
``--images`` (any folder, searched to any depth, e.g. your unlabeled/ images).

``--export model.pt`` writes three files, and only them (no evaluation): ``model.pt`` (the state_dict and the architecture record,
for this package), ``model.pt2`` (a ``torch.export`` program: ``torch.export.load("model.pt2").module()``
alone maps a float tensor of images (B, C, S, S) in [0, 1] to class probabilities (B, classes); the
normalisation is inside) and ``model.json`` (the classes, S, C and how to turn an image file into
that tensor).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from laplacedrl.config import shared_flag
from laplacedrl.errors import OneLineParser, UserError, main_guard


def write_confusion(m, classes, out: Path) -> None:
    """confusion.csv and confusion.png (counts, rows normalised for the colours)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, m):
            w.writerow([name, *row.tolist()])
    rates = m / m.sum(1, keepdims=True).clip(min=1)
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 20:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        for i in range(len(classes)):
            for j in range(len(classes)):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test set)")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)


def folder_images(folder: Path) -> list:
    """Image files below ``folder`` (recursively), sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a directory")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(f"--images {folder} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    return paths


def load_image(path, channels: int, size: int):
    """An image file as the exported model takes it: (C, S, S) float in [0, 1], the shorter side
    resized to S (bilinear) and the central S x S square kept."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from laplacedrl.data.folders import resize_center_crop
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return to_tensor(im if im.size == (size, size) else resize_center_crop(im, size))


def export(predictor, classes, spec, dataset, stem: Path) -> list:
    """``<stem>.pt2`` (the :class:`Predictor` as a ``torch.export`` program, any batch size) and
    ``<stem>.json`` (how to use it)."""
    import torch

    from laplacedrl.engine.checkpoint import atomic_write_json
    example = torch.rand(2, spec.channels, spec.image_size, spec.image_size)
    program = torch.export.export(predictor.cpu().eval(), (example,),
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    script, meta = stem.with_suffix(".pt2"), stem.with_suffix(".json")
    try:
        torch.export.save(program, str(script))
    except OSError as e:
        raise UserError(f"could not write {script}: {e.strerror or e}") from None
    atomic_write_json(meta, {
        "model": script.name, "classes": list(classes), "dataset": dataset,
        "input": f"float32 tensor (B, {spec.channels}, {spec.image_size}, {spec.image_size}), values in [0, 1]",
        "channels": spec.channels, "image_size": spec.image_size,
        "color": "grayscale (PIL mode L)" if spec.channels == 1 else "RGB",
        "resize": f"shorter side to {spec.image_size} (bilinear), then the central "
                  f"{spec.image_size}x{spec.image_size} square",
        "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "applied": "inside the model"},
        "output": "(B, classes) class probabilities, in the order of 'classes'"})
    return [script, meta]


def main(argv=None):
    p = OneLineParser(prog="python -m laplacedrl.evaluate", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("run", help="a train_ssl.py run dir or its last.pt")
    shared_flag(p, "data_dir", "", shown="the run's")
    p.add_argument("--images", default="", help="a folder of images to predict (any depth) instead of the test set")
    p.add_argument("--export", default="", help="write MODEL.pt (state_dict + record), MODEL.pt2 "
                                                "(torch.export: loads with torch alone) and MODEL.json, "
                                                "and nothing else (no evaluation; with --images, also "
                                                "the predictions)")
    p.add_argument("--out", default="", help="output folder (default: the run dir)")
    shared_flag(p, "batch_size")
    shared_flag(p, "device")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from laplacedrl.data import AugmentedSubset, load_dataset, make_transform
    from laplacedrl.engine.checkpoint import EXPORT, atomic_write_json, load_classifier, save_checkpoint
    from laplacedrl.engine.run import pick_device
    from laplacedrl.ssl.evaluation import Predictor, predict, topk_correct

    device = pick_device(args.device)
    model, ck = load_classifier(args.run, "run")
    cfg = ck["config"]
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test, spec = load_dataset(cfg["dataset"], args.data_dir or cfg.get("data_dir") or None)
    predictor = Predictor(model, spec.mean, spec.std).eval()

    if args.export:
        save_checkpoint(args.export, EXPORT, {"classifier": ck["classifier"], "state_dict": model.state_dict(),
                                              "classes": list(train.classes), "dataset": cfg["dataset"],
                                              "channels": spec.channels, "image_size": spec.image_size,
                                              "mean": list(spec.mean), "std": list(spec.std)})
        written = [args.export, *export(predictor, train.classes, spec, cfg["dataset"], Path(args.export))]
        print(f"wrote {', '.join(map(str, written))}")
        if not args.images:
            return {"export": args.export}
    predictor.to(device)

    if args.images:
        paths = folder_images(Path(args.images))
        probs = []
        with torch.no_grad():
            for s in range(0, len(paths), args.batch_size):
                part = paths[s:s + args.batch_size]
                batch = torch.stack([load_image(q, spec.channels, spec.image_size) for q in part])
                probs.append(predictor(batch.to(device)).cpu())
        probs = torch.cat(probs)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "predicted", "probability", "top5"])
            for path, idx, pr in zip(paths, top.indices.tolist(), top.values.tolist()):
                w.writerow([str(path), train.classes[idx[0]], f"{pr[0]:.4f}",
                            " ".join(train.classes[i] for i in idx)])
        print(f"predicted {len(paths)} images -> {out / 'predictions.csv'}")
        return {"predictions": str(out / "predictions.csv"), "probabilities": probs}
    if not len(test):
        raise UserError(f"{cfg['dataset']} has no test images here (your own images: a test/<class>/ folder); "
                        f"use --images FOLDER to predict")

    loader = torch.utils.data.DataLoader(AugmentedSubset(test, np.arange(len(test)), make_transform(spec, "eval")),
                                         batch_size=cfg.get("eval_batch_size") or args.batch_size)
    logits, _ = predict(model.to(device), loader, device)
    targets = torch.as_tensor(test.targets)
    c1, c5 = topk_correct(logits, targets)
    result = {"test_top1": 100.0 * c1 / len(test), "test_top5": 100.0 * c5 / len(test),
              "test_images": len(test), "dataset": cfg["dataset"], "epochs_done": ck["epoch"],
              "run": str(args.run)}
    from sklearn.metrics import confusion_matrix       # rows: true class, columns: predicted
    m = confusion_matrix(test.targets, logits.argmax(1).numpy(), labels=np.arange(spec.num_classes))
    write_confusion(m, train.classes, out)
    atomic_write_json(out / "evaluation.json", result)
    print(f"test top-1 {result['test_top1']:.2f}% top-5 {result['test_top5']:.2f}% on {len(test)} "
          f"{cfg['dataset']} test images -> {out / 'confusion.png'}, {out / 'confusion.csv'}")
    return result


if __name__ == "__main__":
    sys.exit(main_guard(main))
