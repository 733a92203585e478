"""laplacedrl: DRL pretraining of a classifier's encoder, then LaplaceNet semi-supervised training.

The package is built in layers; a module imports only from its own layer or the ones below it
(``tests/test_layers.py`` reads every import and checks this). From the top:

1. tools -- the command lines: ``train_ssl.py`` / ``pretrain_drl.py`` (and ``laplacedrl.train_ssl``,
   ``laplacedrl.pretrain_drl``), ``laplacedrl.evaluate``, ``sample``, ``probe``, ``reproduce`` (with
   the paper's numbers, ``paper_results``), ``demo_images``, ``benchmarks/``;
2. recipes -- ``laplacedrl.recipes``: the one place where a run's steps are put in order
   (``ssl``: LaplaceNet training, ``pretrain``: DRL pretraining, ``sample``: conditional samples);
3. parts -- what the recipes use: ``laplacedrl.ssl`` (schedule, loaders, the training epoch, the
   graph step, the t-search, evaluation), ``laplacedrl.drl`` (the pretraining models, data and
   step), ``laplacedrl.data`` (datasets, label splits, augmentation, batch streams);
4. engine -- ``laplacedrl.engine``: checkpoints, the run dir, torch.distributed, random streams;
5. models -- ``laplacedrl.models``: WRN / ResNet backbones, the learnable t, the score network;
6. math -- ``laplacedrl.diffusion`` (SDEs, objectives, samplers, EMA) and ``laplacedrl.graph``
   (kNN, label propagation);
7. base -- ``laplacedrl.config`` (plain data and checks), ``choices``, ``errors``: importable from
   anywhere, importing nothing above them.
"""

__version__ = "0.1.0"
