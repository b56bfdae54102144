"""The plugin models' dataset: RecBole's SequentialDataset, with training windows for ``train_positions: all``.

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

from typing import Any

import torch

from recbole_llm.errors import RecboleLLMError

TRAIN_POSITIONS = ("last", "all")


def training_rows(config: Any) -> int | None:
    """Check ``train_positions`` and ``train_window_stride`` of ``config`` (a Config or its dict) and return the
    training windows' stride (see :func:`window_stride`). Called when the Config is built, before any data is
    read, and again by the dataset, whose Config may come from a checkpoint.

    Raises RecboleLLMError (one line) on a ``train_positions`` other than last or all, or a bad stride.
    """
    setting = config.get if isinstance(config, dict) else config.__getitem__
    positions = setting("train_positions")
    if positions not in TRAIN_POSITIONS:
        raise RecboleLLMError(f"train_positions={positions!r} is not supported; use {' or '.join(TRAIN_POSITIONS)}")
    return window_stride(config)


def window_stride(config: Any) -> int | None:
    """The training windows' stride for ``config``: ``train_window_stride``, or ``MAX_ITEM_LIST_LENGTH`` when
    it is null (windows that do not overlap); None with ``train_positions: last`` (no windows).

    Raises RecboleLLMError when the stride is not an integer in [1, MAX_ITEM_LIST_LENGTH], or is set with
    ``train_positions: last`` or with pre-split data (``benchmark_filename``: one row per user, no prefixes).
    """
    setting = config.get if isinstance(config, dict) else config.__getitem__  # a Config reads unset keys as None
    stride, length = setting("train_window_stride"), setting("MAX_ITEM_LIST_LENGTH")
    if setting("train_positions") != "all":
        if stride is not None:
            raise RecboleLLMError(
                f"train_window_stride={stride!r} applies to train_positions: all only; set train_positions: all "
                "or train_window_stride: null"
            )
        return None
    if stride is None:
        return length
    if setting("benchmark_filename"):
        raise RecboleLLMError(
            f"train_window_stride={stride!r} needs RecBole's prefix rows, and pre-split data (benchmark_filename) "
            "has one row per user: use train_window_stride: null"
        )
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= length:
        raise RecboleLLMError(
            f"train_window_stride={stride!r} must be an integer from 1 to MAX_ITEM_LIST_LENGTH ({length}): e.g. "
            f"train_window_stride: {max(length // 2, 1)}"
        )
    return stride


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
        raise RecboleLLMError(
            "train_positions=all needs training rows grouped by user in time order, as RecBole's sequential "
            "dataset builds them; use train_positions: last with this data"
        )
    first = torch.nonzero(starts).squeeze(-1)  # [users] first row of each run
    sizes = torch.diff(torch.cat((first, torch.tensor([user_ids.numel()]))))
    index_in_group = torch.arange(user_ids.numel()) - first[group]
    from_end = sizes[group] - 1 - index_in_group
    return torch.nonzero(from_end % window == 0).squeeze(-1)
