"""The pretraining images and their one persistent loader."""
from __future__ import annotations


from laplacedrl.data import AugmentedSubset, labeled_indices, make_transform
from laplacedrl.data.streams import BatchStream, SeededItems, loader_workers, make_loader
from laplacedrl.engine.distributed import epoch_permutation


def pretraining_images(cfg, train, spec):
    """(training indices pretraining draws from, or None for all; the transform)."""
    idx = labeled_indices(cfg, train, spec) if cfg.pretrain_data == "labeled" else None
    if cfg.augment == "weak":
        tf = make_transform(spec, "weak", 1, cfg.cutout)
    else:
        from torchvision import transforms as T
        evalt = make_transform(spec, "eval")
        tf = T.Compose([T.RandomHorizontalFlip(), evalt]) if spec.hflip else evalt
    return idx, tf


def pretraining_loader(cfg, train, rows, transform, step, info, device):
    """One persistent loader over the pretraining images: every rank its slice of one (seed, pass)
    permutation, full global batches only; a resumed run goes on where the stream was."""
    ws = info.world_size
    usable = len(rows) - len(rows) % cfg.batch_size

    def order(epoch, pass_index, rng):
        return epoch_permutation(len(rows), cfg.seed, pass_index)[:usable][info.rank::ws]

    stream = BatchStream(order, cfg.batch_size // ws, cfg.seed, "pretrain-data", info.rank, endless=True)
    stream.set_epoch(0, skip=step)
    workers = loader_workers(cfg.num_workers)
    return make_loader(SeededItems(AugmentedSubset(train, rows, transform)), workers, device,
                       batch_sampler=stream), workers
