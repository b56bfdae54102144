"""Ranking in numpy: what a top-k graph does inside, for graphs that return every item's score.

Used by the validator (the PyTorch model's scores, ranked as a top-k graph ranks them) and by the runtime
(graphs without top-k, and artifacts with an item index, rank here). Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def exclusions(seen: Sequence[np.ndarray], exclude_seen: Sequence[bool]) -> np.ndarray:
    """The graph's ``exclude_items`` input, int64 [rows, n] 0-padded: each row's whole history where
    ``exclude_seen`` is set, nothing (a padding column) where it is not."""
    rows = [ids if flag else ids[:0] for ids, flag in zip(seen, exclude_seen)]
    out = np.zeros((len(rows), max([1, *(len(r) for r in rows)])), dtype=np.int64)
    for row, ids in enumerate(rows):
        out[row, : len(ids)] = ids
    return out


def item_scores(user_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """Every item's score, float32 [rows, n_items], from an item-index graph's ``user_vectors`` [rows, hidden]
    and the table ``item_vectors`` [n_items, hidden]: the product the scoring graphs compute inside."""
    return np.asarray(user_vectors, dtype=np.float32) @ np.asarray(item_vectors, dtype=np.float32).T


def top_k(scores: np.ndarray, k: int, exclude_items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(top_items int64, top_scores float32), each [rows, k], from ``scores`` [rows, n_items]: padding and
    ``exclude_items`` (int64 [rows, n], 0-padded) score ``-inf``; ties keep the lower id first.

    Large catalogues take a partial sort (``np.argpartition``: linear in the items, not n log n) whose answer
    is the full stable sort's, ties at the k-th score included."""
    scores = np.asarray(scores, dtype=np.float32).copy()
    if exclude_items is not None:
        np.put_along_axis(scores, exclude_items, -np.inf, axis=1)  # column 0 absorbs the padding
    scores[:, 0] = -np.inf
    if k >= scores.shape[1] or scores.shape[1] <= PARTIAL_SORT_FROM:
        items = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        items = np.empty((len(scores), k), dtype=np.int64)
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, best, axis=1).min(axis=1)  # the k-th best score of each row
        for row, (row_scores, threshold) in enumerate(zip(scores, kth)):
            above = np.flatnonzero(row_scores > threshold)  # fewer than k: all of them are in
            above = above[np.lexsort((above, -row_scores[above]))]  # best first, then lower id
            tied = np.flatnonzero(row_scores == threshold)[: k - len(above)]  # lowest ids first
            items[row] = np.concatenate([above, tied])
    return items.astype(np.int64), np.take_along_axis(scores, items, axis=1)


PARTIAL_SORT_FROM = 4096  # items from which top_k partially sorts
