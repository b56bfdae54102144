"""Which training rows a window keeps, for ``train_positions: all``
(the keys themselves: :mod:`recbole_llm.model.positions`).

RecBole trains sequential models on every prefix of every history (``SequentialDataset.data_augmentation``):
a user with n training items gives n - 1 rows, each predicting one item. A model that predicts the next
item at every position of a causal encoder (``train_positions: all``: SASRec's own objective, as in
Kang & McAuley, ICDM 2018, and gSASRec, Petrov & Macdonald, RecSys 2023) learns from one row every
``MAX_ITEM_LIST_LENGTH`` items all that the n - 1 prefixes hold: the rows kept here are the ones ending a
window, counted back from each user's most recent training item, so every training target is predicted
exactly once per epoch. ``train_window_stride: N`` (N < ``MAX_ITEM_LIST_LENGTH``) keeps a row every N targets
instead, and the model scores only the last N positions of each: every target is still predicted once, but
from at least ``MAX_ITEM_LIST_LENGTH - N + 1`` items when the history holds them, as at evaluation
(non-overlapping windows predict a window's first targets from a few items only). Sequence augmentation
(``augmentation``) then changes which items a row's scored positions hold, as it is meant to. Validation and
test keep every row RecBole builds.

The dataset class is :class:`recbole_llm.training.dataset.PluginSequentialDataset`, which RecBole finds as
``recbole.data.dataset.<Model>Dataset`` (``recbole/data/utils.py:41``); this module imports no RecBole.
"""

from __future__ import annotations

import torch

from recbole_llm.errors import DataError


def window_ends(user_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Indices of the rows that end a window of ``window`` targets, counted back from each user's last row.

    ``user_ids`` ``[rows]``: the user of each training row, rows grouped by user in time order (as RecBole's
    augmentation and leave-one-out split leave them). Row j of a user with m rows is kept when
    ``(m - 1 - j) % window == 0``: the last row always, then every ``window``-th before it. Returns a sorted
    index tensor ``[kept rows]``. Raises RecboleLLMError when the rows are not grouped by user.
    """
    if user_ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.ones_like(user_ids, dtype=torch.bool)
    starts[1:] = user_ids[1:] != user_ids[:-1]
    group = torch.cumsum(starts.long(), 0) - 1  # [rows] which run of rows each row belongs to
    if int(group[-1]) + 1 != torch.unique(user_ids).numel():
        raise DataError(
            "train_positions=all needs training rows grouped by user in time order, as RecBole's sequential "
            "dataset builds them; use train_positions: last with this data"
        )
    first = torch.nonzero(starts).squeeze(-1)  # [users] first row of each run
    sizes = torch.diff(torch.cat((first, torch.tensor([user_ids.numel()]))))
    index_in_group = torch.arange(user_ids.numel()) - first[group]
    from_end = sizes[group] - 1 - index_in_group
    return torch.nonzero(from_end % window == 0).squeeze(-1)
