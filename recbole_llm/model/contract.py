"""What the plugin's trainer, export and DDP code call on a model: one declared contract.

Every plugin model (:class:`recbole_llm.model.bertrec.BERTRec` and its subclasses) satisfies
:class:`PluginModel`; RecBole's own sequential models satisfy :class:`Exportable` (the one hook export
needs is added to RecBole's ``SequentialRecommender`` by :mod:`recbole_llm.patches`). Callers test
``isinstance(model, PluginModel)`` once instead of probing for attributes one by one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Exportable(Protocol):
    """A sequential model that export can trace."""

    ITEM_SEQ: str
    ITEM_SEQ_LEN: str
    n_items: int
    max_seq_length: int

    def export_scores(self, item_seq: torch.Tensor, item_length: torch.Tensor) -> torch.Tensor:
        """Scores of every item, float ``[batch, n_items]`` (column 0 is padding, any value), from internal
        item ids ``item_seq`` int64 ``[batch, length]`` (right-padded with 0) and ``item_length`` int64
        ``[batch]``. Traceable: no Python loop or branch over the batch or its values."""
        ...


@runtime_checkable
class PluginModel(Exportable, Protocol):
    """A recbole_llm model, as :class:`recbole_llm.training.trainer.PluginTrainer`, export and DDP use it."""

    encoder: nn.Module  # the Hugging Face encoder (adapters included): its ``config`` names heads and width
    item_embedding: nn.Embedding  # the id table FGM perturbs (adversarial: fgm)
    backbone_hash: str | None  # SHA-256 of a frozen backbone's weights; None when the backbone trains

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds (frozen-backbone models: the trained tensors and the backbone's hash)."""
        ...

    def after_optimizer_step(self, global_step: int) -> None:
        """Called after every optimizer step (AdaLoRA's rank allocation); ``global_step`` counts from 1."""
        ...

    def merge_adapters(self) -> bool:
        """Merge parameter-efficient adapters into the backbone where they can merge (for export); True when
        something merged."""
        ...

    def bake_item_table(self) -> None:
        """Fix the item representations (text ones included) as a constant table for inference and export."""
        ...
