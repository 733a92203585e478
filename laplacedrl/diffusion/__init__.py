"""Diffusion-based representation learning: SDEs, objectives, samplers and the parameter EMA."""
from laplacedrl.diffusion.ema import ExponentialMovingAverage
from laplacedrl.diffusion.losses import (OBJECTIVES, ae_loss, drl_loss, dsm_loss, encode, mixup_drl_loss,
                                         model_score, parse_t_sampling, sample_t, vdrl_loss)
from laplacedrl.diffusion.sampling import conditional_score_fn, euler_maruyama_sampler, pc_sampler
from laplacedrl.diffusion.sde import EPS, SDE, T, VESDE, VPSDE, sde_from_dict

__all__ = [
    "EPS", "T", "SDE", "VESDE", "VPSDE", "sde_from_dict",
    "OBJECTIVES", "parse_t_sampling", "sample_t", "model_score", "encode", "dsm_loss",
    "drl_loss", "vdrl_loss", "mixup_drl_loss", "ae_loss",
    "conditional_score_fn", "euler_maruyama_sampler", "pc_sampler", "ExponentialMovingAverage",
]
