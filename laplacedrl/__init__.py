"""laplacedrl: DRL pretraining of a classifier's encoder, then LaplaceNet semi-supervised training.

The package is built in layers. Below, every module and package is named once, from the top down,
and each imports only from those named after it (``tests/test_layers.py`` reads every import and
checks it against this list):

1. tools -- ``benchmarks/`` (which may run the command lines), the command lines: ``train_ssl.py``
   and ``pretrain_drl.py`` (at the repository root), ``laplacedrl.train_ssl``, ``laplacedrl.pretrain_drl``, ``laplacedrl.sample``,
   ``laplacedrl.evaluate``, ``laplacedrl.probe``, ``laplacedrl.demo_images``, ``laplacedrl.reproduce``
   with the paper's numbers, ``laplacedrl.paper_results``;
2. recipes -- ``laplacedrl.recipes``: the one place where a run's steps are put in order (LaplaceNet
   training, DRL pretraining, conditional samples, the probe);
3. parts -- what the recipes use: ``laplacedrl.ssl`` (schedule, loaders, the training epoch, the
   graph step, the t-search, evaluation) and ``laplacedrl.drl`` (the pretraining models, data and
   step);
4. data -- ``laplacedrl.data``: the dataset loaders, label splits, augmentation, batch streams;
5. engine -- ``laplacedrl.engine``: checkpoints, the run dir, torch.distributed, random streams;
6. models -- ``laplacedrl.models``: WRN / ResNet backbones, the learnable t, the score network;
7. math -- ``laplacedrl.diffusion`` (SDEs, objectives, samplers, EMA) and ``laplacedrl.graph``
   (kNN, label propagation);
8. base -- plain data and checks, importable from anywhere: ``laplacedrl.config`` (the one config
   system), ``laplacedrl.choices`` (the names the CLIs accept), ``laplacedrl.registry`` (the dataset
   table), ``laplacedrl.images`` (the image-set types and the datasets' constants),
   ``laplacedrl.errors``.
"""

__version__ = "0.1.0"
