"""``repeatable: False`` for sequential models: full-ranking evaluation that never recommends an item the user
already has, as RecBole does for its general models (:mod:`recbole_llm.patches` installs these wrappers, each
naming the RecBole line it answers).

RecBole 1.2.1 refuses ``repeatable: False`` for sequential models (``recbole/config/configurator.py:378``),
and its ``FullSortEvalDataLoader`` gives sequential rows no history to mask (``general_dataloader.py:258/282``):
every earlier item of the user stays rankable, so a model is scored on how well it avoids recommending what
the user already rated. Published sequential results on MovieLens mostly mask them (SASRec+ of Klenitskiy &
Vasilev, RecSys 2023, ``filter_seen: True``; MovieLens users never rate a movie twice), which is why RecBole's
sequential figures and theirs do not compare. With ``repeatable: False``:

- the Config accepts it for sequential models (``repeatable: True``, RecBole's default, is unchanged), and
  negative sampling (BPR training, ``uniN`` evaluation) stays RecBole's sequential sampler;
- ``SequentialDataset.data_augmentation`` also records each user's whole item sequence in time order and, per
  row, :data:`FULL_LENGTH_FIELD`: how many of the user's items come before the row's target (``item_length``
  counts only the last ``MAX_ITEM_LIST_LENGTH`` of them);
- full-ranking evaluation masks every one of those earlier items, however old, except the row's own target
  (an item consumed again stays a hit, as RecBole's general models keep positives out of their history).
  Pre-split data (``benchmark_filename``) is not augmented: its rows' own item lists are masked.

Only ``repeatable: False`` changes anything: with the default no field is added and nothing is masked.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from recbole_llm.errors import DataError

FULL_LENGTH_FIELD = "full_item_length"  # the user's items before a row's target, however many (not cut)


def _sequential_not_repeatable(config) -> bool:
    from recbole.utils import ModelType

    return config["MODEL_TYPE"] == ModelType.SEQUENTIAL and not config["repeatable"]


@contextlib.contextmanager
def not_repeatable_accepted(final) -> Iterator[None]:
    """Around ``Config._set_default_parameters`` (:func:`recbole_llm.patches.config.wrap_set_default_parameters`,
    the one wrapper of that method) and ``create_samplers``: what RecBole decides by ``repeatable`` for
    sequential models (its refusal at configurator.py:378, its sampler) sees True, and the value stays False.
    ``final``: the Config or its dict."""
    masked = _sequential_not_repeatable(final)
    if masked:
        final["repeatable"] = True
    try:
        yield
    finally:
        if masked:
            final["repeatable"] = False


def wrap_create_samplers(original):
    """``create_samplers`` keeps RecBole's ``RepeatableSampler`` for sequential models with ``repeatable: False``:
    RecBole picks the non-repeatable ``Sampler`` by the key (``data/utils.py:316``), which would leave out of
    training negatives (BPR) and sampled evaluation (``uniN``) every item of the user's split, later ones
    included; only full-ranking evaluation's mask changes."""

    @functools.wraps(original)
    def create_samplers(config, dataset, built_datasets):
        with not_repeatable_accepted(config):
            return original(config, dataset, built_datasets)

    return create_samplers


def wrap_data_augmentation(original):
    """``SequentialDataset.data_augmentation`` also keeps each user's whole sequence and each row's full
    history length, with ``repeatable: False``."""
    import numpy as np
    import torch

    @functools.wraps(original)
    def data_augmentation(self):
        if self.config["repeatable"] or self.uid_field is None or self.time_field is None:
            return original(self)  # RecBole's own checks and errors for a dataset without these fields
        self.sort(by=[self.uid_field, self.time_field], ascending=True)  # as RecBole sorts before augmenting
        users = self.inter_feat[self.uid_field].numpy()
        items = self.inter_feat[self.iid_field].clone()
        counts = np.bincount(users, minlength=self.user_num)
        starts = np.concatenate(([0], np.cumsum(counts)))
        place = np.arange(len(users)) - starts[users]  # each interaction's place in its user's sequence
        original(self)
        # RecBole makes a row of every interaction but each user's first, in this order (sequential_dataset.py:99)
        full_length = torch.from_numpy(place[place > 0])
        if len(full_length) != len(self.inter_feat):
            raise RuntimeError("repeatable: False: RecBole's augmented rows do not match the sorted interactions")
        self.inter_feat.update(type(self.inter_feat)({FULL_LENGTH_FIELD: full_length}))
        self.user_item_sequences = (torch.from_numpy(starts), items)  # [users + 1] offsets, [interactions]

    return data_augmentation


def wrap_full_sort_collate_fn(original):
    """``FullSortEvalDataLoader.collate_fn`` gives sequential rows their history to mask, with
    ``repeatable: False``: ``(row, item)`` index pairs, as RecBole's general models get."""
    import torch

    @functools.wraps(original)
    def collate_fn(self, index):
        batch = original(self, index)
        if not self.is_sequential or self.config["repeatable"]:
            return batch
        interaction, _, positive_u, positive_i = batch
        dataset = self._dataset
        sequences = getattr(dataset, "user_item_sequences", None)
        if sequences is not None and FULL_LENGTH_FIELD in interaction:
            starts, items = sequences
            lengths = interaction[FULL_LENGTH_FIELD]
            rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            first = torch.repeat_interleave(starts[interaction[dataset.uid_field]] - torch.cumsum(lengths, 0)
                                            + lengths, lengths)
            seen = items[first + torch.arange(len(rows))]
        elif not dataset.config["benchmark_filename"]:  # never silently mask less than the whole history
            raise DataError("repeatable: False: this dataset was built without its users' whole histories (saved "
                            "with repeatable: True?); rebuild it with repeatable: False")
        else:  # pre-split data: each row's own item list is the history it was given
            item_list = interaction[dataset.item_id_list_field]
            length = interaction[dataset.item_list_length_field]
            kept = torch.arange(item_list.size(1)).unsqueeze(0) < length.unsqueeze(1)
            rows, columns = kept.nonzero(as_tuple=True)
            seen = item_list[rows, columns]
        kept = seen != interaction[dataset.iid_field][rows]  # a sequential row's positive is its own target
        return interaction, (rows[kept], seen[kept]), positive_u, positive_i

    return collate_fn
