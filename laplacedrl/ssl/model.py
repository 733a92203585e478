"""The classifier of a run (LaplaceNet's WRN, or an ``--init`` encoder with a learnable t) and its SGD."""
from __future__ import annotations

import torch

from laplacedrl.engine.checkpoint import DRL_CKPT, load_checkpoint, load_encoder
from laplacedrl.engine.seeds import derive_seed, seed_torch_cpu
from laplacedrl.errors import UserError
from laplacedrl.models import LearnableTime, arch_record, build_model
from laplacedrl.ssl.handoff import body_param_groups, reset_norms, shrink_perturb, unwrap


def init_classifier(cfg, spec):
    """The run's classifier before training: LaplaceNet's WRN (``cfg.arch``), or the ``--init``
    encoder with a fresh head and a learnable t starting at ``cfg.t_init``; then the hand-off
    options ``--norm-reset`` and ``--shrink`` / ``--perturb`` (:mod:`laplacedrl.ssl.handoff`)."""
    return apply_handoff(pretrained_or_fresh(cfg, spec), cfg)


def apply_handoff(model, cfg):
    """``--norm-reset``, then ``--shrink`` / ``--perturb``, against a fresh network of the same
    architecture drawn from the run's own "handoff" stream (the other streams are untouched)."""
    if not (cfg.norm_reset or cfg.shrink != 1.0 or cfg.perturb != 0.0):
        return model
    with torch.random.fork_rng():                  # the global streams continue as without the options
        seed_torch_cpu(derive_seed(cfg.seed, "handoff"))       # the fresh net is built on the CPU
        fresh = build_model(**arch_record(unwrap(model)))
    try:
        if cfg.norm_reset:
            reset_norms(model, fresh)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.shrink != 1.0 or cfg.perturb != 0.0:
        shrink_perturb(model, fresh, cfg.shrink, cfg.perturb)
    return model


def pretrained_or_fresh(cfg, spec):
    """LaplaceNet's WRN (``cfg.arch``), or the ``--init`` encoder with a fresh head and t."""
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
    """SGD (Nesterov) over every parameter, t included (published); ``--no-t-weight-decay`` exempts t;
    ``--body-lr-mult`` gives the body (all but the head and t) its own rate."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = [(n, p) for n, p in params if n == "t_logit" and not cfg.t_weight_decay]
    rest = [(n, p) for n, p in params if not (n == "t_logit" and not cfg.t_weight_decay)]
    groups = (body_param_groups(rest, cfg.body_lr_mult, {})
              + body_param_groups(exempt, cfg.body_lr_mult, {"weight_decay": 0.0}))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)
