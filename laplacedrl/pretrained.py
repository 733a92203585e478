"""The handoff from pretrain_drl.py to train_ssl.py: a DRL ``ckpt.pt`` -> classifier with learnable t."""
from __future__ import annotations

from laplacedrl.engine.checkpoint import DRL_FORMAT, load_checkpoint
from laplacedrl.errors import UserError

HEAD_PREFIX = "head."  # the linear classifier: never pretrained, always fresh


def load_pretrained_classifier(path, spec, t_init: float = 0.5, trainable: bool = True):
    """Build the time-conditioned classifier of ``path``'s encoder for a dataset of shape ``spec``.

    The backbone comes from the checkpoint's architecture record (with this dataset's class count),
    its weights are the encoder's (the EMA weights pretraining saved), the head is new, and t is a
    learnable scalar starting at ``t_init`` fed through the checkpoint's SDE (``sde.net_input``).
    A checkpoint of another input shape or architecture is refused with a UserError.
    """
    from laplacedrl.diffusion.sde import sde_from_dict
    from laplacedrl.models import LearnableTime, build_model

    ckpt = load_checkpoint(path, DRL_FORMAT, "--init")
    rec = dict(ckpt["encoder_arch"])
    if (rec["in_channels"], rec["image_size"]) != (spec.channels, spec.image_size):
        raise UserError(f"--init {path} was pretrained on {rec['in_channels']}x{rec['image_size']}x"
                        f"{rec['image_size']} images ({ckpt['config'].get('dataset')}), this dataset "
                        f"has {spec.channels}x{spec.image_size}x{spec.image_size}")
    rec["num_classes"] = spec.num_classes
    backbone = build_model(**rec)
    state = {k: v for k, v in ckpt["encoder"].items() if not k.startswith(HEAD_PREFIX)}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes
        detail = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:1]
        raise UserError(f"--init {path}: encoder weights do not fit {rec['arch']} ({detail})") from None
    missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if missing or unexpected:
        raise UserError(f"--init {path}: encoder weights do not fit {rec['arch']} "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    return LearnableTime(backbone, sde_from_dict(ckpt["sde"]).net_input, t_init, trainable)

