"""Table 3's "DRL t-search", as the published code runs it.

From the ``--init`` weights, one supervised phase (all the supervised rounds, a fresh optimiser,
its own data order, augmentations and mixup draws) at each t of :data:`T_SEARCH_VALUES`; the phase
whose rounds reached the lowest training loss (a round's loss: the mean over its last pass) goes on
from its final weights into the semi-supervised epochs. BatchNorm cancels the batch-shared t bias
in training, so in effect this is a best-of-11 by training loss. Running a phase is the recipe's
business (``run_phase``); the search, its resume and its record are here.
"""
from __future__ import annotations

import numpy as np

T_SEARCH_VALUES = tuple(float(t) for t in np.linspace(0.0, 1.0, 11).clip(0.01, 0.99))


def lowest_phase(searched: dict) -> int:
    """Index of the phase whose rounds reached the lowest training loss."""
    return int(np.argmin([min(p["losses"]) for p in searched["phases"]]))


def search_t(run_phase, searched: dict | None = None, best_state=None, after_phase=None):
    """Run the phases of :data:`T_SEARCH_VALUES` that ``searched`` does not hold yet.

    Args:
        run_phase: ``run_phase(i, t) -> (round losses, round log entries, final state_dict)``.
        searched: the record of a search resumed after a kill (``{"phases": [...]}``), or None.
        best_state: the best phase's final weights so far (a resumed search), or None.
        after_phase: ``after_phase(searched, best_state)`` after each phase (the recipe saves there).

    Returns:
        ``(searched, best_state)``: ``searched["phases"]`` one ``{"t", "losses", "entries"}`` per t
        and ``searched["chosen"]`` the index of the phase that goes on, ``best_state`` its weights.
    """
    searched = searched or {"phases": [], "chosen": None}
    for i, t in enumerate(T_SEARCH_VALUES):
        if i < len(searched["phases"]):
            continue
        losses, entries, state = run_phase(i, t)
        searched["phases"].append({"t": t, "losses": losses, "entries": entries})
        if best_state is None or lowest_phase(searched) == i:
            best_state = state
        if after_phase is not None:
            after_phase(searched, best_state)
    searched["chosen"] = lowest_phase(searched)
    return searched, best_state


def search_record(searched: dict | None) -> dict | None:
    """What metrics.json says of a search: every t, each phase's round losses and lowest loss, the t
    that went on."""
    if not searched:
        return None
    chosen = searched.get("chosen")
    return {"t": [p["t"] for p in searched["phases"]],
            "lowest_loss": [min(p["losses"]) for p in searched["phases"]],
            "phase_losses": [p["losses"] for p in searched["phases"]],
            "chosen_t": None if chosen is None else searched["phases"][chosen]["t"]}
