"""Approximate retrieval (``retrieval="ann"``): a faiss IVF index over an item-index artifact's item table.

Needs faiss (``pip install faiss-cpu``). The index holds the exact vectors, so the scores it returns are
exact; only which items are looked at is approximate.
"""

from __future__ import annotations

import threading

import numpy as np

from recbole_llm.errors import RecboleLLMError
from recbole_llm.serving.sessions import usable_cores

# faiss IVF over the item table (inner product): about 4 sqrt(n) k-means lists, at least 39 items each (what
# faiss's k-means asks), and a tenth of them probed per query, or enough lists to scan 4096 items (so a
# small catalogue is searched whole). Chosen on benchmarks/catalogue_scale.py's
# 100k-item catalogue, where HNSW (M=32) reached Recall@10 0.90 at efSearch 256 and 0.98 only at 1024 (3.3 ms a
# query), this 0.99 at 1.4 ms; its results give Recall@10 and the speed-up at every size.
ANN_LISTS_PER_SQRT, ANN_MIN_LIST, ANN_PROBED, ANN_MIN_SCANNED = 4, 39, 0.1, 4096


def build_index(vectors: np.ndarray):
    """A faiss IVF index (inner product, exact vectors in the lists) over the item table, padding left out:
    faiss id i is item i + 1. Returns (index, lists probed per query)."""
    try:
        import faiss
    except ImportError:
        raise RecboleLLMError("retrieval='ann' needs faiss: pip install faiss-cpu") from None
    faiss.omp_set_num_threads(usable_cores())
    items = np.ascontiguousarray(vectors[1:], dtype=np.float32)
    if len(items) <= ANN_MIN_SCANNED:  # searched whole anyway: a flat index, no clustering
        index = faiss.IndexFlatIP(items.shape[1])
        index.add(items)
        return index, None
    lists = max(1, min(int(ANN_LISTS_PER_SQRT * len(items) ** 0.5), len(items) // ANN_MIN_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(items.shape[1]), items.shape[1], lists,
                               faiss.METRIC_INNER_PRODUCT)
    # k-means on a sample of 64 items a list (faiss samples 256 a list itself): a 1M-item catalogue took
    # 950 s to index on 2 busy cores otherwise; the lists then take every item
    sample = np.random.default_rng(0).choice(len(items), size=min(len(items), 64 * lists), replace=False)
    index.train(items[np.sort(sample)])
    index.add(items)
    per_list = len(items) / lists
    return index, min(lists, max(1, round(ANN_PROBED * lists), int(np.ceil(ANN_MIN_SCANNED / per_list))))


class AnnIndex:
    """The index over an item table (:func:`build_index`) and the lists probed per query; searches and
    additions take turns (faiss: no search while items are added)."""

    def __init__(self, vectors: np.ndarray):
        self.index, self.probed = build_index(vectors)
        self.lock = threading.Lock()

    def add(self, new: np.ndarray) -> None:
        """New items' vectors, appended to the table: into their nearest lists; faiss ids follow the table's rows."""
        with self.lock:
            self.index.add(new)

    def top_k(self, user_vectors: np.ndarray, k: int, exclude_items: np.ndarray,
              vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items int64, scores float32) [rows, k] from the index: k plus as many as a row excludes are searched,
        excluded ones and items past the call's catalogue (``vectors``: items added meanwhile are not in it)
        dropped, ties at equal score lower id first; -inf where fewer were found. Scores are exact."""
        import faiss

        n_items = len(vectors)
        excluded = [set(row[row > 0].tolist()) for row in exclude_items]
        width = min(n_items - 1, k + max(len(row) for row in excluded))
        index, probed = self.index, self.probed
        params = None if probed is None else faiss.SearchParametersIVF(nprobe=probed)
        with self.lock:
            _, ids = index.search(np.ascontiguousarray(user_vectors, dtype=np.float32), width, params=params)
        items = np.zeros((len(ids), k), dtype=np.int64)
        top = np.full((len(ids), k), -np.inf, dtype=np.float32)
        for row, found in enumerate(ids + 1):
            keep = np.array([i for i in found.tolist() if 0 < i < n_items and i not in excluded[row]], dtype=np.int64)
            if not len(keep):
                continue
            scores = vectors[keep] @ user_vectors[row]
            order = np.lexsort((keep, -scores))[:k]
            items[row, : len(order)], top[row, : len(order)] = keep[order], scores[order]
        return items, top
