"""What DRL pretraining optimises and what it hands over: the encoder + score net bundle and ``ckpt.pt``."""
from __future__ import annotations

import torch
from torch import nn

from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.diffusion.losses import ae_loss, drl_loss, mixup_drl_loss, vdrl_loss
from laplacedrl.diffusion.sde import VESDE, VPSDE
from laplacedrl.errors import UserError
from laplacedrl.models import arch_record, build_model
from laplacedrl.models.score_net import ScoreNet, VariationalHead, score_net_record


def make_sde(cfg):
    return VESDE(cfg.sigma_min, cfg.sigma_max) if cfg.sde == "ve" else VPSDE(cfg.beta_min, cfg.beta_max)


class DRLModels(nn.Module):
    """Everything pretraining optimises: the time-conditioned encoder, the score net (with the
    autoencoder's decoder for ``ae``) and, for VDRL, the head giving q(z | x0). One module, so one
    optimiser, one EMA and one state_dict cover them."""

    def __init__(self, cfg, spec, sde):
        super().__init__()
        self.cfg, self.spec, self.sde = cfg, spec, sde     # plain attributes, not state
        self.encoder = build_model(cfg.arch, spec.num_classes, spec.channels, spec.image_size,
                                   time_cond=True, t_bias=cfg.t_bias)
        self.encoder.head.requires_grad_(False)   # the classifier head plays no part in pretraining
        feat = self.encoder.feature_dim
        code_dim = cfg.code_dim or feat
        if cfg.objective != "vdrl" and code_dim != feat:
            raise UserError(f"--code-dim applies to vdrl only (the drl code is the {feat}-d feature)")
        self.head = VariationalHead(feat, code_dim) if cfg.objective == "vdrl" else None
        try:
            self.score_net = ScoreNet(spec.channels, spec.image_size, cfg.nf, cfg.ch_mult, cfg.num_res_blocks,
                                      cfg.attn_resolutions, cfg.dropout, code_dim,
                                      decoder=cfg.objective == "ae")
        except ValueError as e:
            raise UserError(f"score net for {spec.image_size}x{spec.image_size} images: {e}") from None

    def forward(self, x0: torch.Tensor, t: torch.Tensor) -> dict:
        """The objective's loss dict for clean images x0 (B, C, H, W) at times t (B,)."""
        cfg, sde, spec, enc, net = self.cfg, self.sde, self.spec, self.encoder, self.score_net
        if cfg.objective == "drl":
            return drl_loss(enc, net, sde, x0, t, l1_weight=cfg.l1_weight)
        if cfg.objective == "mixup-drl":
            return mixup_drl_loss(enc, net, sde, x0, t, alpha=cfg.mixup_alpha, l1_weight=cfg.l1_weight)
        if cfg.objective == "vdrl":
            return vdrl_loss(enc, self.head, net, sde, x0, t, kl_weight=cfg.kl_weight)
        return ae_loss(enc, net, sde, x0, t, spec.mean, spec.std, l1_weight=cfg.l1_weight)


def export(models: DRLModels, ema: ExponentialMovingAverage, cfg, sde, spec, step, labeled) -> dict:
    """The ``ckpt.pt`` payload: the encoder's raw (or ``--export ema``) weights, the EMA score net.

    ``state_dict()`` returns the live tensors, so the EMA weights are copied out before the raw ones
    are put back (otherwise the "EMA" entries would silently hold the raw weights).
    """
    def snapshot(module):
        return None if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}
    raw_encoder = snapshot(models.encoder)
    ema.store(models.parameters())
    ema.copy_to(models.parameters())
    out = {"step": step, "objective": cfg.objective, "sde": sde.to_dict(),
           "dataset": {"name": cfg.dataset, "channels": spec.channels, "image_size": spec.image_size,
                       "data_dir": cfg.data_dir},
           "labeled": None if labeled is None else labeled.tolist(),
           "encoder_arch": arch_record(models.encoder),
           "encoder": raw_encoder if cfg.export == "raw" else snapshot(models.encoder),
           "encoder_weights": cfg.export,
           "head_arch": models.head.args if models.head is not None else None, "head": snapshot(models.head),
           "score_net_arch": score_net_record(models.score_net), "score_net": snapshot(models.score_net)}
    ema.restore(models.parameters())
    return out
