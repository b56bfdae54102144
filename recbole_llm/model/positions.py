"""Which positions a plugin model trains on: ``train_positions`` and ``train_window_stride``, read and checked.

``last`` scores the last position of each of RecBole's prefix rows; ``all`` scores every position of a causal
encoder (SASRec's own objective, Kang & McAuley, ICDM 2018; gSASRec, Petrov & Macdonald, RecSys 2023) over
training windows (:mod:`recbole_llm.training.windows` keeps the rows that end one). The model, the Config
checks and the dataset read the keys here, so the model needs nothing from training.
"""

from __future__ import annotations

from typing import Any

from recbole_llm.errors import ConfigError
from recbole_llm.settings import choice, integer

TRAIN_POSITIONS = ("last", "all")


def training_rows(config: Any) -> int | None:
    """Check ``train_positions`` and ``train_window_stride`` of ``config`` (a Config or its dict) and return the
    training windows' stride (see :func:`window_stride`). Called when the Config is built, before any data is
    read, and again by the dataset, whose Config may come from a checkpoint.

    Raises ConfigError (one line) on a ``train_positions`` other than last or all, or a bad stride.
    """
    setting = config.get if isinstance(config, dict) else config.__getitem__
    positions = setting("train_positions")
    if choice("train_positions", positions, TRAIN_POSITIONS) != positions:  # the dataset reads it as written
        raise ConfigError(f"train_positions={positions!r} must be lower-case: use train_positions: {positions.lower()}")
    return window_stride(config)


def window_stride(config: Any) -> int | None:
    """The training windows' stride for ``config``: ``train_window_stride``, or ``MAX_ITEM_LIST_LENGTH`` when
    it is null (windows that do not overlap); None with ``train_positions: last`` (no windows).

    Raises ConfigError when the stride is not an integer in [1, MAX_ITEM_LIST_LENGTH], or is set with
    ``train_positions: last`` or with pre-split data (``benchmark_filename``: one row per user, no prefixes).
    """
    setting = config.get if isinstance(config, dict) else config.__getitem__  # a Config reads unset keys as None
    stride, length = setting("train_window_stride"), setting("MAX_ITEM_LIST_LENGTH")
    if setting("train_positions") != "all":
        if stride is not None:
            raise ConfigError(
                f"train_window_stride={stride!r} applies to train_positions: all only; set train_positions: all "
                "or train_window_stride: null"
            )
        return None
    if stride is None:
        return length
    if setting("benchmark_filename"):
        raise ConfigError(
            f"train_window_stride={stride!r} needs RecBole's prefix rows, and pre-split data (benchmark_filename) "
            "has one row per user: use train_window_stride: null"
        )
    try:
        return integer("train_window_stride", stride, high=length, example=max(length // 2, 1))
    except ConfigError as error:
        raise ConfigError(f"{error} (MAX_ITEM_LIST_LENGTH is {length})") from None
