r"""
BERTAdaLoRA
################################################

Reference:
    Qingru Zhang et al. "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning." In ICLR 2023.

BERTRec with a frozen encoder and peft's AdaLoRA: LoRA whose rank budget is reallocated during training
from ``init_r`` towards ``target_r`` per matrix by importance. RecBole's trainer knows nothing of it, so:
``total_step`` is the optimizer steps the plugin trainer will take (the batches of RecBole's training
DataLoader for this data and negative sampling, times ``epochs``), known at construction; the plugin
trainer calls ``update_and_allocate`` after every optimizer step (``after_optimizer_step``), and AdaLoRA's
orthogonal regulariser is added to RecBole's loss (``orth_reg_weight``).
"""

from __future__ import annotations

from typing import Any

import torch

from recbole_llm.errors import ConfigError, RecboleLLMError
from recbole_llm.model.bertpeft import BERTPEFT, peft_config_from
from recbole_llm.settings import integer, number


def optimizer_steps_per_epoch(config: Any, dataset: Any) -> int:
    """The optimizer steps the plugin trainer takes per epoch: the batches of RecBole's training DataLoader.

    RecBole's TrainDataLoader yields ``train_batch_size // times`` rows per batch, where ``times`` depends on
    negative sampling (``sample_num`` for pairwise BPR, ``1 + sample_num`` for pointwise models, 1 without
    sampling), and splits rows across ranks in distributed runs; building one for ``dataset`` counts its
    batches exactly as the trainer iterates them. Nothing is sampled: no batch is drawn.
    """
    from recbole.data.utils import get_dataloader

    return len(get_dataloader(config, "train")(config, dataset, None, shuffle=False))


def _step_count(config: Any, key: str) -> int | None:
    """A step count the user set (None when unset: the plugin derives it), a whole number >= 0 (5.0 is 5)."""
    value = config[key]
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        value = int(value)  # --tinit=100.0 is 100 steps
    try:
        return integer(key, value, low=0)
    except ConfigError as error:
        raise ConfigError(f"{error}, or remove it (null: derived from this run)") from None


class BERTAdaLoRA(BERTPEFT):
    r"""A frozen BERT encoder with AdaLoRA adapters whose ranks shrink to a budget during training."""

    peft_type = "ADALORA"

    def build_peft_config(self, config, dataset, peft_type: str):
        """AdaLoRA's config, its schedule (``total_step``, ``tinit``, ``tfinal``) derived from this run."""
        # fractions of the training steps
        tinit_ratio = number("tinit_ratio", config["tinit_ratio"], low=0, high=1, high_open=True, example=0.1)
        tfinal_ratio = number("tfinal_ratio", config["tfinal_ratio"], low=0, high=1, high_open=True, example=0.2)
        if tinit_ratio + tfinal_ratio >= 1:
            raise ConfigError(
                f"tinit_ratio={tinit_ratio} and tfinal_ratio={tfinal_ratio} leave no steps to reallocate ranks in; "
                "set both to 0 or more with a sum below 1 (defaults 0.1 and 0.2)"
            )
        given = {key: _step_count(config, key) for key in ("total_step", "tinit", "tfinal")}
        epochs = config["epochs"]  # RecBole's Config refuses a non-positive one; null reaches here
        steps_per_epoch = optimizer_steps_per_epoch(config, dataset)
        total_step = steps_per_epoch * epochs if isinstance(epochs, int) else 0
        if total_step <= 0:
            raise RecboleLLMError(
                f"AdaLoRA needs training steps but epochs={epochs!r} and the training data has "
                f"{len(dataset)} sequences; set epochs to 1 or more"
            )
        if given["total_step"] is not None and given["total_step"] != total_step:
            raise ConfigError(
                f"total_step={given['total_step']} does not match the {total_step} optimizer steps of this run "
                f"({steps_per_epoch} batches per epoch x epochs={epochs}); remove total_step, the "
                "plugin derives it"
            )
        # tinit/tfinal as fractions of the run, so the budget schedule fits any dataset and epoch count
        defaults = {
            "total_step": total_step,
            "tinit": int(tinit_ratio * total_step),
            "tfinal": int(tfinal_ratio * total_step),
        }
        tinit = defaults["tinit"] if given["tinit"] is None else given["tinit"]
        tfinal = defaults["tfinal"] if given["tfinal"] is None else given["tfinal"]
        if tinit + tfinal >= total_step:
            raise ConfigError(
                f"tinit={tinit} and tfinal={tfinal} leave no steps to reallocate ranks in this run's "
                f"total_step={total_step}; lower them, or remove them and set tinit_ratio/tfinal_ratio"
            )
        return peft_config_from(config, peft_type, defaults=defaults)

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
