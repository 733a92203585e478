"""Pseudo-labelling by kNN-graph label propagation (LaplaceNet steps 2b-2f).

``propagate`` is the whole step; ``knn_search`` the exact neighbour search it uses. The slow, faithful
re-implementation of the published algorithm lives in :mod:`laplacedrl.graph.reference`.
"""

from laplacedrl.graph.knn import knn_search, resolve_backend
from laplacedrl.graph.propagate import PropagationResult, propagate

__all__ = ["PropagationResult", "knn_search", "propagate", "resolve_backend"]
