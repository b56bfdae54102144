"""The plugin models' dataset class: RecBole's SequentialDataset with training windows (:mod:`recbole_llm.training.windows`).

A module of its own, importable by name, so that RecBole can pickle the dataset (``save_dataset``).
"""

from __future__ import annotations

from recbole.data.dataset import SequentialDataset

from recbole_llm.model.positions import training_rows
from recbole_llm.training.windows import window_ends


class PluginSequentialDataset(SequentialDataset):
    """RecBole's sequential dataset; with ``train_positions: all`` the training split keeps one row every
    ``train_window_stride`` (by default ``MAX_ITEM_LIST_LENGTH``) targets (see :func:`recbole_llm.training.windows.window_ends`)."""

    @property
    def item_counter(self):
        """Training interactions per item: every prefix row's target, as RecBole's models count them
        (TailNDCG's threshold, Pop), also when the rows were cut to windows."""
        kept = getattr(self, "prefix_item_counter", None)
        return kept if kept is not None else SequentialDataset.item_counter.fget(self)

    def build(self):
        datasets = super().build()
        stride = training_rows(self.config)  # None with train_positions: last
        if stride is not None and datasets:
            train = datasets[0]
            kept = window_ends(train.inter_feat[train.uid_field], stride)
            windows = train.copy(train.inter_feat[kept])
            windows.prefix_item_counter = train.item_counter
            datasets[0] = windows
        return datasets


def register_for_plugin_models() -> None:
    """``recbole.data.dataset.<Model>Dataset = PluginSequentialDataset`` for every plugin model."""
    import recbole.data.dataset as dataset_module

    from recbole_llm.model.catalog import PLUGIN_MODELS

    for name in PLUGIN_MODELS:
        setattr(dataset_module, f"{name}Dataset", PluginSequentialDataset)


register_for_plugin_models()
