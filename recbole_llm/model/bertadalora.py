r"""
BERTAdaLoRA
################################################

Reference:
    Qingru Zhang et al. "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning." In ICLR 2023.

BERTRec with a frozen encoder and peft's AdaLoRA: LoRA whose rank budget is reallocated during training
from ``init_r`` towards ``target_r`` per matrix by importance. RecBole's trainer knows nothing of it, so:
``total_step`` is derived from the training data and ``epochs`` at construction, the plugin trainer calls
``update_and_allocate`` after every optimizer step (``after_optimizer_step``), and AdaLoRA's orthogonal
regulariser is added to RecBole's loss (``orth_reg_weight``).
"""

from __future__ import annotations

import math

import torch

from recbole_llm.errors import RecboleLLMError
from recbole_llm.model.bertpeft import BERTPEFT, peft_config_from


class BERTAdaLoRA(BERTPEFT):
    r"""A frozen BERT encoder with AdaLoRA adapters whose ranks shrink to a budget during training."""

    peft_type = "ADALORA"

    def build_peft_config(self, config, peft_type: str):
        steps_per_epoch = math.ceil(len(self._train_dataset) / config["train_batch_size"])
        total_step = steps_per_epoch * int(config["epochs"] or 0)
        if total_step <= 0:
            raise RecboleLLMError(
                f"AdaLoRA needs training steps but epochs={config['epochs']} and the training data has "
                f"{len(self._train_dataset)} sequences; set epochs to 1 or more"
            )
        # tinit/tfinal as fractions of the run, so the budget schedule fits any dataset and epoch count
        defaults = {
            "total_step": total_step,
            "tinit": int(float(config["tinit_ratio"] or 0.0) * total_step),
            "tfinal": int(float(config["tfinal_ratio"] or 0.0) * total_step),
        }
        return peft_config_from(config, peft_type, defaults=defaults)

    def __init__(self, config, dataset):
        self._train_dataset = dataset
        super().__init__(config, dataset)
        del self._train_dataset

    def calculate_loss(self, interaction):
        self._orthogonal_loss = None
        loss = super().calculate_loss(interaction)
        if self._orthogonal_loss is not None:
            loss = loss + self._orthogonal_loss
        return loss

    def encoder_output(self, item_seq: torch.Tensor, item_table: torch.Tensor | None = None):
        output = super().encoder_output(item_seq, item_table)
        if self.training:
            self._orthogonal_loss = output.loss  # zero plus AdaLoRA's orth_reg_weight * regulariser
        return output

    def after_optimizer_step(self, global_step: int) -> None:
        """AdaLoRA's budget allocation, after every optimizer step."""
        self.encoder.base_model.update_and_allocate(global_step)

    def rank_budget(self) -> int:
        """The ranks allocated now, summed over all adapted matrices (init_r each until the first allocation)."""
        from peft.tuners.adalora import SVDLinear

        peft_config = self.encoder.peft_config["default"]
        if peft_config.rank_pattern:
            return int(sum(sum(bool(kept) for kept in mask) for mask in peft_config.rank_pattern.values()))
        adapted = sum(1 for module in self.encoder.modules() if isinstance(module, SVDLinear))
        return adapted * peft_config.init_r
