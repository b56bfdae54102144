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

from recbole_llm.errors import RecboleLLMError

AUGMENTATIONS = ("crop", "mask", "reorder")


def _rate(config: Any, key: str, low_open: bool = True) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open
                                                                                else 0 <= value <= 1):
        bounds = "in (0, 1]" if low_open else "in [0, 1]"
        raise RecboleLLMError(f"{key}={value!r:.40} must be a number {bounds}")
    return float(value)


class SequenceAugmenter:
    """Augments the item-sequence fields of a training Interaction; built from a RecBole Config."""

    def __init__(self, config: Any, item_seq_field: str, item_seq_len_field: str):
        chosen = config["augmentation"]
        if isinstance(chosen, str):
            chosen = [chosen]
        if chosen is not None and (not isinstance(chosen, (list, tuple))
                                   or not all(isinstance(name, str) for name in chosen)):
            raise RecboleLLMError(f"augmentation={chosen!r:.60} must be a list of {', '.join(AUGMENTATIONS)} or null")
        self.kinds = [name.lower() for name in chosen or []]
        unknown = [name for name in self.kinds if name not in AUGMENTATIONS]
        if unknown:
            raise RecboleLLMError(f"augmentation '{unknown[0]}' is not supported; use {', '.join(AUGMENTATIONS)}")
        self.prob = _rate(config, "augmentation_prob", low_open=False)
        self.crop_ratio = _rate(config, "crop_ratio")
        self.mask_rate = _rate(config, "mask_rate", low_open=False)
        self.reorder_ratio = _rate(config, "reorder_ratio", low_open=False)
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
