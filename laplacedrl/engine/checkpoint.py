"""Checkpoint formats (defined and versioned here, once), atomic writes and one loader per purpose.

Every checkpoint is a dict of tensors and plain Python data with ``format`` and ``version`` entries
and exactly the keys listed in :data:`FORMATS` (``save_checkpoint`` refuses anything else):

``laplacedrl.ssl-run`` -- ``last.pt`` of train_ssl.py, written after every epoch:
    config (resolved, plain dict), epoch (epochs done), model (state_dict of the classifier),
    classifier (its record: ``{"backbone": build_model kwargs, "learnable_t": bool, "t_trainable":
    bool, "sde": SDE dict or None}``, enough to rebuild it without the config), optimizer, history (one dict per epoch),
    labeled (the labeled training indices), t_search (the t-search's per-phase losses and the chosen
    t, or None). ``--snapshot-epochs`` also writes this format after chosen epochs as
    ``snapshots/epoch_<k>.pt`` (``k = 0``: before training), e.g. for ``probe --classifier``.
``laplacedrl.drl-run`` -- ``last.pt`` of pretrain_drl.py while it trains (deleted when it finishes):
    config, step, models (state_dict of everything trained: encoder, score net, VDRL head), optimizer,
    ema (the score-SDE-style EMA state), rng (each rank's torch generator states, so that a resumed
    run draws what an uninterrupted one would), window (each rank's running sums of the log interval
    in progress). Version 3 (version 2 lacked rng and window).
``laplacedrl.drl`` -- ``ckpt.pt`` of pretrain_drl.py, what ``train_ssl.py --init``, the probe and the
    sampler read:
    config, step, objective, sde (``SDE.to_dict()``), dataset ``{name, channels, image_size,
    data_dir}``, labeled (the training indices pretraining drew from, or None for all images),
    encoder_arch (build_model kwargs) and encoder (state_dict; raw or EMA weights as
    ``encoder_weights`` says), head_arch / head (the VDRL head, EMA, or None), score_net_arch /
    score_net (EMA weights; the autoencoder's net carries its decoder). ``--snapshot-every N`` also
    writes this format for earlier steps as ``snapshots/ckpt_<step>.pt`` (e.g. to probe the code
    over training).
``laplacedrl.classifier`` -- ``python -m laplacedrl.evaluate RUN --export model.pt``: a trained
    classifier for use elsewhere: classifier (the record above), state_dict, classes (names by
    label index), dataset, channels, image_size, mean / std (the input normalisation). Beside it
    ``evaluate`` writes ``<name>.pt2`` and ``<name>.json`` (no format of this package: a
    ``torch.export`` program, which loads with torch alone).

Files are written to a temporary file in the same folder, flushed, given the user's umask, then
renamed over the target: a kill at any moment leaves the old file or the new one, never a torn one.
A run's ``last.pt`` keeps its predecessor as ``last.prev.pt`` (see
:meth:`laplacedrl.engine.run.RunDir.save`). A write that fails (a full disk, a read-only folder)
leaves no temporary file and raises a one-line :class:`~laplacedrl.errors.UserError`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from laplacedrl.errors import UserError

SSL_RUN = "laplacedrl.ssl-run"
DRL_RUN = "laplacedrl.drl-run"
DRL_CKPT = "laplacedrl.drl"
EXPORT = "laplacedrl.classifier"
VERSIONS = {SSL_RUN: 2, DRL_RUN: 3, DRL_CKPT: 2, EXPORT: 2}     # per format; a change bumps its own
FORMATS = {
    SSL_RUN: ("config", "epoch", "model", "classifier", "optimizer", "history", "labeled", "t_search"),
    DRL_RUN: ("config", "step", "models", "optimizer", "ema", "rng", "window"),
    DRL_CKPT: ("config", "step", "objective", "sde", "dataset", "labeled", "encoder_arch", "encoder",
               "encoder_weights", "head_arch", "head", "score_net_arch", "score_net"),
    EXPORT: ("classifier", "state_dict", "classes", "dataset", "channels", "image_size", "mean", "std"),
}


# ============ writing ============
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """Write ``path`` through a temporary file in its folder; ``keep_previous``: first move the old
    ``path`` there (a kill in between leaves that previous copy and no ``path``)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())         # mkstemp makes 0600; results follow the umask
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise UserError(f"could not write {path}: {reason} (a full disk or a read-only folder?); "
                        f"what was written before is intact") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:                       # renamed into place, or the folder turned read-only
                pass


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, when ``e`` says the file system refused it (a full disk, a file-size limit, a
    read-only folder), else None.

    ``torch.save`` into a file meets the OSError of a failed write first; its zip writer then raises
    a RuntimeError (``[enforce fail at inline_container.cc...] unexpected pos ...``) while closing
    the archive, with that OSError as its context.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e.strerror or str(e)
        e = e.__cause__ or e.__context__
    return None


def atomic_write_text(path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj) -> None:
    """JSON in the dict's own key order (callers put the headline numbers first)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def first_nonfinite(obj, name: str = "") -> str | None:
    """The name of the first floating-point tensor in ``obj`` (nested dicts / lists / tuples) holding
    a NaN or an infinity, or None."""
    import torch
    if torch.is_tensor(obj):
        return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = first_nonfinite(value, f"{name}.{key}" if name else str(key))
        if found:
            return found
    return None


def save_checkpoint(path, fmt: str, payload: dict, keep_previous: Path | None = None) -> None:
    """``torch.save`` of ``{format, version, **payload}`` to ``path``, atomically.

    ``payload`` must hold exactly the keys :data:`FORMATS` documents for ``fmt`` (ValueError);
    ``keep_previous``: where the old file goes first (see :func:`_atomic_write`).
    """
    import torch
    keys = set(payload)
    want = set(FORMATS[fmt])
    if keys != want:
        raise ValueError(f"{fmt} checkpoint: missing {sorted(want - keys)}, unexpected {sorted(keys - want)}")
    _atomic_write(path, lambda f: torch.save({"format": fmt, "version": VERSIONS[fmt], **payload}, f),
                  keep_previous)


# ============ reading ============
def load_checkpoint(path, fmt: str, what: str = "checkpoint") -> dict:
    """A checkpoint of format ``fmt`` written by this project, or a one-line UserError.

    Args:
        path: file to read.
        fmt: expected ``format`` entry (:data:`SSL_RUN`, :data:`DRL_RUN` or :data:`DRL_CKPT`).
        what: how the message names the file (e.g. ``"--init"``).
    """
    import torch
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        # weights_only: a checkpoint holds tensors and plain data only, so a hostile file cannot run
        # code on load; mmap: reading a few entries does not read the whole file.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- not a zip, truncated, a pickle of other objects, ...
        raise UserError(f"{what} {path} is not a readable torch checkpoint (not a checkpoint file, "
                        f"or truncated)") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{what} {path} is not a laplacedrl checkpoint")
    if ckpt["format"] != fmt:
        raise UserError(f"{what} {path} is a {ckpt['format']} checkpoint, expected {fmt}")
    if ckpt.get("version") != VERSIONS[fmt]:
        raise UserError(f"{what} {path} has format version {ckpt.get('version')}, this laplacedrl "
                        f"reads version {VERSIONS[fmt]} (rerun the command that made it)")
    return ckpt


def load_state(module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line UserError on a mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(first[1:3])[:200] if len(first) > 1 else first[0][:200]
        raise UserError(f"{what} does not match the model architecture: {detail}") from None


def init_values(path) -> dict:
    """What a ``ckpt.pt`` decides for ``train_ssl.py --init``: ``{"dataset", "data_dir", "arch"}``
    (the dataset and data dir it was pretrained on, its encoder's architecture)."""
    ck = load_checkpoint(path, DRL_CKPT, "--init")
    return {"dataset": ck["dataset"]["name"], "data_dir": ck["dataset"].get("data_dir", ""),
            "arch": ck["encoder_arch"]["arch"]}


def load_encoder(path, what: str = "--init"):
    """The pretrained encoder of a ``ckpt.pt`` -> ``(encoder (eval mode), sde, ckpt)``.

    The one rule for everyone who needs the encoder (train_ssl.py --init, the probe): the backbone
    is rebuilt from ``encoder_arch`` and loaded strictly, the SDE from its record.
    """
    from laplacedrl.diffusion.sde import sde_from_dict
    from laplacedrl.models import build_model

    ck = load_checkpoint(path, DRL_CKPT, what)
    try:
        encoder = build_model(**ck["encoder_arch"])
        sde = sde_from_dict(ck["sde"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what} {path}: bad encoder or SDE record ({e})") from None
    if not encoder.time_cond:
        raise UserError(f"{what} {path}: the encoder is not time-conditioned")
    load_state(encoder, ck["encoder"], f"{what} {path}")
    return encoder.eval(), sde, ck


def load_score_model(path, what: str = "checkpoint"):
    """Everything sampling needs from a ``ckpt.pt`` -> ``(encoder, head, score_net, sde, ckpt)``.

    ``head`` is the VDRL head or None; the score net carries the EMA weights. An autoencoder
    checkpoint's net has a decoder and cannot sample (the caller checks ``ckpt["objective"]``).
    """
    from laplacedrl.models.score_net import VariationalHead, build_score_net

    encoder, sde, ck = load_encoder(path, what)
    try:
        net = build_score_net(**ck["score_net_arch"])
        head = VariationalHead(**ck["head_arch"]) if ck["head_arch"] else None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what} {path}: bad score-net record ({e})") from None
    load_state(net, ck["score_net"], f"{what} {path} (score net)")
    if head is not None:
        load_state(head, ck["head"], f"{what} {path} (VDRL head)")
    return encoder, head, net.eval(), sde, ck


def load_classifier(path, what: str = "checkpoint"):
    """A trained classifier from an SSL run dir (its ``last.pt``) or the file itself.

    Returns ``(model (eval mode), ckpt)``; the model is rebuilt from the ``classifier`` record.
    """
    from laplacedrl.models import classifier_from_record

    path = Path(path)
    ck = load_checkpoint(path / "last.pt" if path.is_dir() else path, SSL_RUN, what)
    try:
        model = classifier_from_record(ck["classifier"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what} {path}: bad classifier record ({e})") from None
    load_state(model, ck["model"], f"{what} {path}")
    return model.eval(), ck
