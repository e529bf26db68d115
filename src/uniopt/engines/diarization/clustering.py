"""Agglomerative clustering of speaker embeddings on cosine distance.

:func:`cluster_embeddings` builds an average-linkage tree (:func:`scipy.cluster.hierarchy.linkage`)
over the cosine distances of L2-normalised embeddings and cuts it at a distance threshold, or into
``num_speakers`` clusters when the count is known. Clusters with fewer than ``min_cluster_size``
members are then folded into the nearest large cluster (by centroid cosine similarity), as pyannote
does with its small clusters, and every embedding is finally assigned to its nearest centroid.
Labels are consecutive integers in order of first member. :func:`assign_to_centroids` maps further
embeddings (too short to be clustered) onto the clusters found.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from uniopt.errors import InputError

__all__ = ["assign_to_centroids", "cluster_centroids", "cluster_embeddings", "l2_normalize"]


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float64 (n, dim)."""
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2:
        raise InputError(f"embeddings must be a 2-D array (n, dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 0, 1, ... in order of first occurrence."""
    order: dict[int, int] = {}
    for label in labels.tolist():
        order.setdefault(label, len(order))
    return np.array([order[label] for label in labels.tolist()], dtype=np.int64)


def cluster_centroids(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit-norm mean embedding of each cluster, (num_clusters, dim), row k for label k."""
    unit = l2_normalize(embeddings)
    labels = np.asarray(labels, dtype=np.int64)
    count = int(labels.max()) + 1 if labels.size else 0
    return l2_normalize(np.stack([unit[labels == k].mean(axis=0) for k in range(count)])) if count else unit[:0]


def assign_to_centroids(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the most cosine-similar centroid for each embedding, (n,) int64."""
    unit, centres = l2_normalize(embeddings), l2_normalize(centroids)
    if centres.shape[0] == 0:
        raise InputError("no centroids to assign embeddings to")
    if unit.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(unit @ centres.T, axis=1).astype(np.int64)


def cluster_embeddings(
    embeddings: np.ndarray,
    *,
    threshold: float = 0.3,
    num_speakers: int | None = None,
    min_cluster_size: int = 1,
    method: str = "average",
    clusterable: np.ndarray | None = None,
) -> np.ndarray:
    """Cluster labels (n,) int64 for ``embeddings`` (n, dim); see the module docstring.

    ``threshold`` is the largest cosine distance (1 - cosine similarity) at which clusters are
    merged; it is ignored when ``num_speakers`` is given. Zero embeddings give no labels, one
    embedding gives one cluster, and never more clusters than embeddings are returned. With a
    boolean ``clusterable`` mask only those rows form the clusters and the others join the nearest
    one (all rows are clustered when none or all are marked).
    """
    unit = l2_normalize(embeddings)
    if clusterable is not None:
        mask = np.asarray(clusterable, dtype=bool)
        if mask.shape != (unit.shape[0],):
            raise InputError(f"clusterable must be a boolean mask of {unit.shape[0]} rows, got shape {mask.shape}")
        if 0 < mask.sum() < mask.size:
            labels = np.zeros(unit.shape[0], dtype=np.int64)
            labels[mask] = cluster_embeddings(
                unit[mask], threshold=threshold, num_speakers=num_speakers, min_cluster_size=min_cluster_size,
                method=method,
            )  # fmt: skip
            labels[~mask] = assign_to_centroids(unit[~mask], cluster_centroids(unit[mask], labels[mask]))
            return _relabel(labels)
    if num_speakers is not None and (
        isinstance(num_speakers, bool) or not isinstance(num_speakers, (int, np.integer)) or num_speakers < 1
    ):
        raise InputError(f"num_speakers must be a positive integer, got {num_speakers!r}")
    if not 0.0 <= threshold <= 2.0:
        raise InputError(f"threshold is a cosine distance in [0, 2], got {threshold}")
    if method not in ("average", "complete", "single", "weighted"):
        raise InputError(f"linkage method must be average, complete, single or weighted, got {method!r}")
    n = unit.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    distances = np.clip(pdist(unit, metric="cosine"), 0.0, 2.0)
    tree = linkage(distances, method=method)
    if num_speakers is not None:
        labels = fcluster(tree, t=min(int(num_speakers), n), criterion="maxclust")
    else:
        labels = fcluster(tree, t=threshold, criterion="distance")
    labels = _relabel(labels)
    sizes = np.bincount(labels)
    large = np.flatnonzero(sizes >= min_cluster_size)
    if num_speakers is None and 0 < large.size < sizes.size:
        centroids = cluster_centroids(unit, labels)[large]
        labels = _relabel(large[assign_to_centroids(unit, centroids)])
    # Final pass: each embedding to its nearest centroid, keeping the number of clusters.
    centroids = cluster_centroids(unit, labels)
    refined = assign_to_centroids(unit, centroids)
    if np.unique(refined).size == centroids.shape[0]:
        labels = _relabel(refined)
    return labels
