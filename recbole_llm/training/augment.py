"""Sequence augmentation for training batches: crop, mask and reorder, as config.

Reference:
    Xu Xie et al. "Contrastive Learning for Sequential Recommendation." In ICDE 2022 (CL4SRec: item crop,
    item mask and item reorder as augmentations of interaction sequences).

Here they regularise next-item training directly (no contrastive loss): each training sequence is, with
probability ``augmentation_prob``, replaced by one augmentation drawn from ``augmentation``. The most recent
item is never moved or masked, so the target still follows the history it was observed after:

- ``crop``: keep the most recent ``ceil(crop_ratio * n)`` items;
- ``mask``: replace ``floor(mask_rate * (n - 1))`` of the older items with padding (the encoder's attention
  mask skips them);
- ``reorder``: shuffle a random run of ``floor(reorder_ratio * (n - 1))`` older items.

Only :class:`recbole_llm.training.trainer.PluginTrainer`'s training batches are augmented; validation and test data
never are. Draws come from a generator seeded with ``seed`` and the epoch, so a run (and a resumed run) is
reproducible.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from recbole_llm.settings import choice, names, number

AUGMENTATIONS = ("crop", "mask", "reorder")


class SequenceAugmenter:
    """Augments the item-sequence fields of a training Interaction; built from a RecBole Config."""

    def __init__(self, config: Any, item_seq_field: str, item_seq_len_field: str):
        # null: none
        chosen = names("augmentation", config["augmentation"], "[crop, mask, reorder]")
        self.kinds = [choice("augmentation", name, AUGMENTATIONS) for name in chosen]
        self.prob = number("augmentation_prob", config["augmentation_prob"], low=0, high=1, example=0.5)
        self.crop_ratio = number("crop_ratio", config["crop_ratio"], low=0, high=1, low_open=True, example=0.6)
        self.mask_rate = number("mask_rate", config["mask_rate"], low=0, high=1, example=0.3)
        self.reorder_ratio = number("reorder_ratio", config["reorder_ratio"], low=0, high=1, example=0.3)
        self.seed = int(config["seed"])
        self.item_seq_field, self.item_seq_len_field = item_seq_field, item_seq_len_field
        self.generator = torch.Generator()

    @property
    def active(self) -> bool:
        return bool(self.kinds) and self.prob > 0

    def start_epoch(self, epoch: int) -> None:
        """Reseed for ``epoch``: the same epoch of the same run draws the same augmentations."""
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __call__(self, interaction):
        """A copy of ``interaction`` with augmented ``item_seq`` / ``item_length`` (on the same device)."""
        item_seq = interaction[self.item_seq_field].cpu().clone()
        item_len = interaction[self.item_seq_len_field].cpu().clone()
        draw = torch.rand(len(item_seq), generator=self.generator)
        which = torch.randint(len(self.kinds), (len(item_seq),), generator=self.generator)
        for row in torch.nonzero(draw < self.prob).flatten().tolist():
            n = int(item_len[row])
            if n < 2:
                continue
            kind = self.kinds[int(which[row])]
            items = item_seq[row, :n].clone()  # a copy: the row is rewritten below
            if kind == "crop":
                keep = max(1, math.ceil(self.crop_ratio * n))
                item_seq[row] = 0
                item_seq[row, :keep] = items[n - keep :]
                item_len[row] = keep
            elif kind == "mask":
                count = math.floor(self.mask_rate * (n - 1))
                if count:
                    positions = torch.randperm(n - 1, generator=self.generator)[:count]
                    item_seq[row, positions] = 0
            else:  # reorder
                span = math.floor(self.reorder_ratio * (n - 1))
                if span >= 2:
                    start = int(torch.randint(n - span, (1,), generator=self.generator)) if n - 1 > span else 0
                    order = torch.randperm(span, generator=self.generator) + start
                    item_seq[row, start : start + span] = items[order]
        from recbole.data.interaction import Interaction

        device = interaction[self.item_seq_field].device
        fields = dict(interaction.interaction)  # the other fields (targets, users) as they are
        fields[self.item_seq_field] = item_seq.to(device)
        fields[self.item_seq_len_field] = item_len.to(device)
        return Interaction(fields)
