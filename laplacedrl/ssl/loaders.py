"""The data of a LaplaceNet run: the labeled / unlabeled split and the loaders built once per run."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from laplacedrl.data import AugmentedSubset, labeled_indices, load_run_dataset, make_transform
from laplacedrl.data.streams import BatchStream, SeededItems, close_loader, loader_workers, make_loader
from laplacedrl.engine.distributed import epoch_shard, shard
from laplacedrl.ssl.schedule import Schedule


@dataclasses.dataclass
class SSLData:
    train: object
    test: object
    spec: object
    lab_idx: np.ndarray          # (L,) labeled training indices
    unl_idx: np.ndarray          # (U,) the others
    targets: torch.Tensor        # (N,) true training labels (only labeled ones reach the loss)
    eval_kind: str = "test"      # what ``test`` is: the test set, or held-out training images

    def visible_labels(self) -> np.ndarray:
        """(N,) what the graph step may see: the labeled images' labels, -1 for every other image."""
        out = np.full(len(self.train), -1, dtype=np.int64)
        out[self.lab_idx] = np.asarray(self.train.targets)[self.lab_idx]
        return out


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

    def close(self) -> None:
        """Stop every loader's workers (at the end of a run, also a failed one)."""
        for loader in (self.labeled, self.unlabeled, self.eval_train, self.eval_test, self.eval_labeled):
            close_loader(loader)

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
