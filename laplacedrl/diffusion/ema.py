"""Exponential moving average of parameters (score-SDE's ``models/ema.py``, in our words).

``shadow <- shadow - (1 - d) (shadow - param)`` after each optimiser step, with
``d = min(decay, (1 + n) / (10 + n))`` and ``n`` the number of updates so far (a warm-up, so early
averages are not dominated by the random init); pass ``use_num_updates=False`` for a constant d.

Typical use: ``ema.update(net.parameters())`` after ``optimizer.step()``; for evaluation/sampling
``ema.store(params); ema.copy_to(params); ...; ema.restore(params)``.
"""
from typing import Iterable, List

import torch


class ExponentialMovingAverage:
    """EMA of a list of parameters; the parameter order must be the same in every call."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.999,
                 use_num_updates: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self.shadow: List[torch.Tensor] = [p.detach().clone() for p in parameters]
        self.backup: List[torch.Tensor] = []

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Move the shadow towards the current parameters."""
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, parameters, strict=True):
            s.sub_((1.0 - decay) * (s - p.detach()))

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Overwrite the parameters with the averages."""
        for s, p in zip(self.shadow, parameters, strict=True):
            p.copy_(s)

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Keep a copy of the current parameters, for :meth:`restore` after :meth:`copy_to`."""
        self.backup = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Put back the parameters saved by :meth:`store`."""
        if not self.backup:
            raise RuntimeError("EMA.restore called without a previous store")
        for b, p in zip(self.backup, parameters, strict=True):
            p.copy_(b)
        self.backup = []

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, expected {len(self.shadow)}")
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = [s.clone().to(old.device) for s, old in zip(state["shadow"], self.shadow)]
