"""The plugin models' dataset: RecBole's SequentialDataset, with training windows for ``train_positions: all``.

RecBole trains sequential models on every prefix of every history (``SequentialDataset.data_augmentation``):
a user with n training items gives n - 1 rows, each predicting one item. A model that predicts the next
item at every position of a causal encoder (``train_positions: all``: SASRec's own objective, as in
Kang & McAuley, ICDM 2018, and gSASRec, Petrov & Macdonald, RecSys 2023) learns from one row every
``MAX_ITEM_LIST_LENGTH`` items all that the n - 1 prefixes hold: the rows kept here are the ones ending a
window, counted back from each user's most recent training item, so every training target is predicted
exactly once per epoch. Validation and test keep every row RecBole builds.

RecBole looks the class up as ``recbole.data.dataset.<Model>Dataset`` (``recbole/data/utils.py:41``);
:func:`register` adds that name for every plugin model.
"""

from __future__ import annotations

import functools

import torch

from recbole_llm.errors import RecboleLLMError

TRAIN_POSITIONS = ("last", "all")


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


@functools.lru_cache(maxsize=None)
def plugin_dataset_class() -> type:
    """``PluginSequentialDataset``: RecBole's SequentialDataset whose training split, with ``train_positions:
    all``, keeps one row per window of ``MAX_ITEM_LIST_LENGTH`` targets (see :func:`window_ends`).

    Made on first use: this module is imported while the plugin installs itself into RecBole, before
    RecBole's dataset module may be imported.
    """
    from recbole.data.dataset import SequentialDataset

    class PluginSequentialDataset(SequentialDataset):
        @property
        def item_counter(self):
            """Training interactions per item: every prefix row's target, as RecBole's models count them
            (TailNDCG's threshold, Pop), also when the rows were cut to windows."""
            kept = getattr(self, "prefix_item_counter", None)
            return kept if kept is not None else SequentialDataset.item_counter.fget(self)

        def build(self):
            datasets = super().build()
            positions = self.config["train_positions"]
            if positions not in TRAIN_POSITIONS:  # the model's read_config says the same, later
                raise RecboleLLMError(f"train_positions={positions!r} is not supported; use last or all")
            if positions == "all" and datasets:
                train = datasets[0]
                kept = window_ends(train.inter_feat[train.uid_field], self.max_item_list_len)
                windows = train.copy(train.inter_feat[kept])
                windows.prefix_item_counter = train.item_counter
                datasets[0] = windows
            return datasets

    PluginSequentialDataset.__module__ = __name__
    return PluginSequentialDataset


def register() -> None:
    """Make RecBole's ``create_dataset`` build the plugin's dataset class for every plugin model."""
    import recbole.data.dataset as dataset_module

    from recbole_llm.catalog import PLUGIN_MODELS

    for name in PLUGIN_MODELS:
        setattr(dataset_module, f"{name}Dataset", plugin_dataset_class())
