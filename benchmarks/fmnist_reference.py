#!/usr/bin/env python
"""Raw-pixel reference points on Fashion-MNIST: what a few labels give without any network.

For each label count and seed: class-balanced labels drawn as train_ssl.py draws them
(``balanced_split(targets, labels, 10, seed)`` over the 60,000 training images), then

- ``svc``: scikit-learn's ``SVC()`` (default settings) fitted on the labeled images' pixels / 255;
- ``label_spreading``: scikit-learn's ``LabelSpreading(kernel="knn", n_neighbors=10)`` over
  the labeled images, --spread-train other training images and the 10,000 test images (pixels / 255);

both scored on the 10,000 test images. Prints one JSON line: per label count the mean and sample
std (%) over the seeds, and every value.

    python benchmarks/fmnist_reference.py --labels 40,250 --seeds 0,1,2
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from laplacedrl.data import balanced_split, load_dataset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labels", default="40,250")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--spread-train", type=int, default=20000,
                   help="training images in the label-spreading graph (labeled ones included)")
    p.add_argument("--data-dir", default="data")
    args = p.parse_args(argv)
    from sklearn.semi_supervised import LabelSpreading
    from sklearn.svm import SVC

    train, test, _ = load_dataset("fashion-mnist", args.data_dir)
    xtr = train.images.reshape(len(train), -1).astype(np.float32) / 255
    xte = test.images.reshape(len(test), -1).astype(np.float32) / 255
    out, t0 = {"dataset": "fashion-mnist", "test_images": len(test)}, time.time()
    for labels in (int(v) for v in args.labels.split(",")):
        runs = {"svc": [], "label_spreading": []}
        for seed in (int(v) for v in args.seeds.split(",")):
            lab = balanced_split(train.targets, labels, 10, seed)
            svc = SVC().fit(xtr[lab], train.targets[lab])
            runs["svc"].append(100 * float(np.mean(svc.predict(xte) == test.targets)))
            rest = np.setdiff1d(np.arange(len(train)), lab)
            extra = np.random.default_rng(seed).choice(rest, args.spread_train - labels, replace=False)
            x = np.concatenate([xtr[lab], xtr[extra], xte])
            y = np.concatenate([train.targets[lab], -np.ones(len(extra) + len(xte), dtype=np.int64)])
            spread = LabelSpreading(kernel="knn", n_neighbors=10).fit(x, y)
            pred = spread.transduction_[-len(xte):]
            runs["label_spreading"].append(100 * float(np.mean(pred == test.targets)))
        out[str(labels)] = {k: {"mean": round(statistics.fmean(v), 2),
                                "std": round(statistics.stdev(v), 2) if len(v) > 1 else None,
                                "runs": [round(a, 2) for a in v]} for k, v in runs.items()}
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
