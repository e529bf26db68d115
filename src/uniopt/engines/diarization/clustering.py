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

__all__ = [
    "assign_to_centroids",
    "cannot_link_matrix",
    "cluster_centroids",
    "cluster_embeddings",
    "cluster_units",
    "constrained_linkage",
    "count_from_gaps",
    "l2_normalize",
]


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


def cannot_link_matrix(windows: np.ndarray, local_speakers: np.ndarray) -> np.ndarray:
    """(n, n) bool: True where two units come from one window but different local speakers."""
    windows, local_speakers = np.asarray(windows), np.asarray(local_speakers)
    if windows.shape != local_speakers.shape or windows.ndim != 1:
        raise InputError("windows and local_speakers must be 1-D arrays of the same length")
    return (windows[:, None] == windows[None, :]) & (local_speakers[:, None] != local_speakers[None, :])


def constrained_linkage(
    embeddings: np.ndarray, cannot_link: np.ndarray | None = None
) -> tuple[list[tuple[int, int, float]], float]:
    """Average-linkage merges on cosine distance that never join two cannot-linked members.

    Returns ``(kept, absorbed, distance)`` for each merge in order (row indices), and the
    distance of the closest pair of clusters left when merging stopped because every remaining
    pair is cannot-linked (2.0 when one cluster is left).
    """
    unit = l2_normalize(embeddings)
    n = unit.shape[0]
    blocked = np.zeros((n, n), dtype=bool) if cannot_link is None else np.asarray(cannot_link, dtype=bool).copy()
    if blocked.shape != (n, n):
        raise InputError(f"cannot_link must be ({n}, {n}), got {blocked.shape}")
    blocked |= blocked.T
    sums = unit @ unit.T  # sum of pairwise similarities between clusters
    sizes = np.ones(n)
    alive = np.ones(n, dtype=bool)
    merges: list[tuple[int, int, float]] = []
    for _ in range(n - 1):
        distance = 1.0 - sums / np.outer(sizes, sizes)
        invalid = blocked | ~alive[:, None] | ~alive[None, :] | np.eye(n, dtype=bool)
        distance[invalid] = np.inf
        flat = int(np.argmin(distance))
        a, b = divmod(flat, n)
        if not np.isfinite(distance[a, b]):
            unconstrained = 1.0 - sums / np.outer(sizes, sizes)
            unconstrained[~alive[:, None] | ~alive[None, :] | np.eye(n, dtype=bool)] = np.inf
            return merges, float(unconstrained.min())
        a, b = min(a, b), max(a, b)
        merges.append((a, b, float(distance[a, b])))
        sums[a] += sums[b]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        blocked[a] |= blocked[b]
        blocked[:, a] |= blocked[:, b]
        alive[b] = False
    return merges, 2.0


def _labels_after(n: int, merges: list[tuple[int, int, float]], count: int) -> np.ndarray:
    """Labels when the merges are applied until ``count`` clusters remain."""
    parent = np.arange(n)
    for a, b, _ in merges[: n - count]:
        parent[parent == b] = a
    return _relabel(parent)


def count_from_gaps(
    merges: list[tuple[int, int, float]], n: int, min_speakers: int = 1, max_speakers: int | None = None,
    single_distance: float = 0.3, residual: float = 2.0,
) -> int:  # fmt: skip
    """Number of clusters at the largest jump between consecutive merge distances, then bounded.

    One cluster is chosen only when even the last merge is closer than ``single_distance``.
    ``residual`` is the distance of the merge that cannot-link constraints prevented (see
    :func:`constrained_linkage`). The count is then clipped to ``[min_speakers, max_speakers]``
    (never below the clusters the constraints leave, nor above ``n``).
    """
    if n == 0:
        return 0
    heights = [d for _, _, d in merges]
    lowest = max(n - len(heights), 1)  # clusters left when no further merge is allowed
    best = lowest
    if not (lowest == 1 and (not heights or heights[-1] < single_distance)):
        best, best_gap = max(lowest, 2), -np.inf
        for count in range(max(lowest, 2), n + 1):
            done = n - count  # merges applied for `count` clusters
            previous = heights[done - 1] if done > 0 else 0.0
            following = heights[done] if done < len(heights) else max(residual, previous)
            if following - previous > best_gap:
                best, best_gap = count, following - previous
    return int(min(max(best, min_speakers, lowest), max_speakers or n, n))


def _allowed(label: int, index: int, labels: np.ndarray, blocked: np.ndarray) -> bool:
    """Whether unit ``index`` may take ``label`` given the labels of the units it cannot link with."""
    return not np.any((labels == label) & blocked[index])


def _assign_constrained(unit: np.ndarray, centroids: np.ndarray, labels: np.ndarray, blocked: np.ndarray,
                        rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """Each of ``rows`` to its most similar centroid that breaks no cannot-link (else the most similar)."""
    labels = labels.copy()
    similarity = unit[rows] @ centroids.T
    for row, scores in zip(rows.tolist(), similarity, strict=True):
        order = np.argsort(-scores)
        others = labels.copy()
        others[row] = -1
        labels[row] = next((int(k) for k in order if _allowed(int(k), row, others, blocked)), int(order[0]))
    return labels


def cluster_units(
    embeddings: np.ndarray,
    cannot_link: np.ndarray | None = None,
    *,
    num_speakers: int | None = None,
    min_speakers: int = 1,
    max_speakers: int | None = None,
    threshold: float | None = None,
    clusterable: np.ndarray | None = None,
    single_distance: float = 0.3,
) -> np.ndarray:
    """Speaker labels (n,) int64 of speech units, counting the speakers from the data.

    Average linkage under cannot-link constraints (:func:`constrained_linkage`) over the
    ``clusterable`` units (all when None), cut into ``num_speakers`` clusters, at cosine distance
    ``threshold``, or else at the largest gap between merge distances within
    ``[min_speakers, max_speakers]`` (:func:`count_from_gaps`). Each unit then moves to its nearest
    centroid unless a cannot-link forbids it; the other units join their nearest allowed centroid.
    """
    unit = l2_normalize(embeddings)
    n = unit.shape[0]
    for name, value in (("num_speakers", num_speakers), ("min_speakers", min_speakers), ("max_speakers", max_speakers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if max_speakers is not None and max_speakers < min_speakers:
        raise InputError(f"max_speakers ({max_speakers}) is below min_speakers ({min_speakers})")
    if threshold is not None and not 0.0 <= threshold <= 2.0:
        raise InputError(f"threshold is a cosine distance in [0, 2], got {threshold}")
    blocked = np.zeros((n, n), dtype=bool) if cannot_link is None else np.asarray(cannot_link, dtype=bool)
    if blocked.shape != (n, n):
        raise InputError(f"cannot_link must be ({n}, {n}), got {blocked.shape}")
    blocked = blocked | blocked.T
    mask = np.ones(n, dtype=bool) if clusterable is None else np.asarray(clusterable, dtype=bool)
    if mask.shape != (n,):
        raise InputError(f"clusterable must be a boolean mask of {n} rows, got shape {mask.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if not mask.any():
        mask = np.ones(n, dtype=bool)
    core = np.flatnonzero(mask)
    merges, residual = constrained_linkage(unit[core], blocked[np.ix_(core, core)])
    m = core.size
    if num_speakers is not None:
        count = min(max(int(num_speakers), m - len(merges)), m)
    elif threshold is not None:
        count = m - sum(1 for _, _, d in merges if d <= threshold)
        count = min(max(count, min_speakers, m - len(merges)), max_speakers or m, m)
    else:
        count = count_from_gaps(merges, m, min_speakers, max_speakers, single_distance, residual)
    labels = np.full(n, -1, dtype=np.int64)
    labels[core] = _labels_after(m, merges, count)
    # Refine: units to their nearest allowed centroid, keeping the number of clusters.
    centroids = cluster_centroids(unit[core], labels[core])
    refined = _assign_constrained(unit, centroids, labels, blocked, core)
    if np.unique(refined[core]).size == centroids.shape[0]:
        labels = refined
    rest = np.flatnonzero(~mask)
    if rest.size:
        labels = _assign_constrained(unit, cluster_centroids(unit[core], labels[core]), labels, blocked, rest)
    return _relabel(labels)
