"""The runtime's records: histories encoded for the graph, the catalogue of items, and the answers.

numpy only; shared by :mod:`~recbole_llm.serving.runtime`, :mod:`~recbole_llm.serving.explain`,
:mod:`~recbole_llm.serving.catalogue` and the service's batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass
class Contribution:
    """How much one history item the model read pushed a recommended item up."""

    item: str  # the history item (raw token)
    effect: float | None  # the recommended item's score minus its score with this item removed from the
    # history; None for a one-item history (nothing is left to score without it)


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_tokens: int  # tokens of this history that the model does not know (skipped)
    # with explain: for each recommended item, the history items the model read, largest effect first
    explanations: list[list[Contribution]] | None = None


class Catalogue(NamedTuple):
    """The items an artifact knows, replaced as a whole when items are added: a call reads it once."""

    tokens: list[str]  # internal id -> raw token; 0 is padding
    token_to_id: dict[str, int]
    vectors: np.ndarray | None  # float32 [len(tokens), dim] of an item-index artifact, else None


class Encoded(NamedTuple):
    """Histories as the graph takes them, plus what post-processing needs."""

    item_seq: np.ndarray  # int64 [rows, max_length]: the most recent known items, 0-padded at the end
    item_length: np.ndarray  # int64 [rows]
    unknown: list[int]  # unknown tokens skipped, per row
    seen: list[np.ndarray]  # every known item id of each row's whole history, unique

    @staticmethod
    def join(parts: Sequence["Encoded"]) -> "Encoded":
        """Rows of several requests, in order, for one model call."""
        return Encoded(np.concatenate([p.item_seq for p in parts]), np.concatenate([p.item_length for p in parts]),
                       [u for p in parts for u in p.unknown], [s for p in parts for s in p.seen])
