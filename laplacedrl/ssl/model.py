"""The classifier of a run (LaplaceNet's WRN, or an ``--init`` encoder with a learnable t) and its SGD."""
from __future__ import annotations

import torch

from laplacedrl.engine.checkpoint import DRL_CKPT, load_checkpoint, load_encoder
from laplacedrl.errors import UserError
from laplacedrl.models import LearnableTime, build_model


def init_classifier(cfg, spec):
    """The run's classifier before training: LaplaceNet's WRN (``cfg.arch``), or the ``--init``
    encoder with a fresh head and a learnable t starting at ``cfg.t_init``."""
    if not cfg.init:
        return build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size)
    pretrained = load_checkpoint(cfg.init, DRL_CKPT, "--init")["dataset"]
    if (pretrained["channels"], pretrained["image_size"]) != (spec.channels, spec.image_size):
        raise UserError(f"--init {cfg.init} was pretrained on {pretrained['channels']}x"
                        f"{pretrained['image_size']}x{pretrained['image_size']} images "
                        f"({pretrained['name']}), {cfg.dataset} has {spec.channels}x{spec.image_size}x"
                        f"{spec.image_size}")
    encoder, sde, ck = load_encoder(cfg.init, "--init")
    rec = dict(ck["encoder_arch"])
    backbone = build_model(**{**rec, "num_classes": spec.num_classes})
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    backbone.load_state_dict({**backbone.state_dict(), **state}, strict=True)   # the head stays fresh
    return LearnableTime(backbone, sde, cfg.t_init, trainable=not cfg.freeze_t)


def current_t(model):
    """The learnable t of an --init classifier (a float), None for a plain backbone."""
    return float(model.t.detach()) if hasattr(model, "t") else None


def make_optimizer(cfg, model):
    """SGD (Nesterov) over every parameter, t included (published); ``--no-t-weight-decay`` exempts t."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = [p for n, p in params if n == "t_logit" and not cfg.t_weight_decay]
    rest = [p for n, p in params if not (n == "t_logit" and not cfg.t_weight_decay)]
    groups = [{"params": rest}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)
