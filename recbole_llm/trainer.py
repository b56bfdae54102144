"""The plugin trainer: RecBole's ``Trainer`` with what fine-tuning a pretrained encoder needs.

RecBole picks it automatically for plugin models (``registry.get_trainer``); RecBole's own models keep
RecBole's trainer. On top of RecBole's loop it adds:

- learning-rate warmup, then constant, linear or cosine decay (``lr_scheduler``, ``warmup_ratio``), with
  transformers' ``get_scheduler``;
- bf16 or fp16 autocast on GPU (``mixed_precision``) with one GradScaler for the whole run and gradients
  unscaled before clipping (RecBole 1.2.1 re-creates its scaler every epoch and clips scaled gradients);
- a per-step hook for models that need one (AdaLoRA's ``update_and_allocate``);
- FGM adversarial training on the item embeddings (``adversarial: fgm``, ``adv_epsilon``; Miyato et al.,
  "Adversarial Training Methods for Semi-Supervised Text Classification", ICLR 2017);
- checkpoints that hold only what trained when the model says so (``checkpoint_state_dict``).
"""

from __future__ import annotations

import os

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_llm.errors import RecboleLLMError

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PluginTrainer(Trainer):
    r"""RecBole's Trainer with warmup and decay, correct mixed precision, per-step hooks and FGM."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.lr_scheduler_name = (config["lr_scheduler"] or "constant").lower()
        self.warmup_ratio = float(config["warmup_ratio"] or 0.0)
        precision = config["mixed_precision"]
        self.adversarial = (config["adversarial"] or "none").lower()
        self.adv_epsilon = float(config["adv_epsilon"] or 0.0)
        if self.lr_scheduler_name not in SCHEDULES:
            raise RecboleLLMError(
                f"lr_scheduler '{config['lr_scheduler']}' is not supported; use one of {', '.join(SCHEDULES)}"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RecboleLLMError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        key = precision.lower() if isinstance(precision, str) else precision
        if key not in PRECISIONS:
            raise RecboleLLMError(f"mixed_precision '{precision}' is not supported; use bf16, fp16 or null")
        if self.adversarial not in ("none", "fgm"):
            raise RecboleLLMError(f"adversarial '{config['adversarial']}' is not supported; use fgm or null")
        if self.adversarial == "fgm" and self.adv_epsilon <= 0:
            raise RecboleLLMError(f"adv_epsilon={self.adv_epsilon} must be > 0 with adversarial: fgm")
        # Mixed precision only on GPU: on CPU autocast is slower for these models (measured) and fp16 unsafe.
        self.autocast_dtype = PRECISIONS[key] if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.scheduler = None
        self.global_step = 0

    def _build_scheduler(self, train_data) -> None:
        from transformers import get_scheduler

        total_steps = max(1, len(train_data) * (self.epochs - self.start_epoch))
        self.scheduler = get_scheduler(
            "constant_with_warmup" if self.lr_scheduler_name == "constant" else self.lr_scheduler_name,
            self.optimizer,
            num_warmup_steps=int(self.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )

    def _fgm_step(self, interaction, loss_func) -> None:
        """Perturb the item embeddings along their gradient, add that loss's gradient, restore."""
        embedding = self.model.item_embedding.weight
        grad = embedding.grad
        if grad is None:
            return
        norm = grad.norm()
        if not torch.isfinite(norm) or norm == 0:
            return
        delta = self.adv_epsilon * grad / norm
        embedding.data.add_(delta)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            adversarial_loss = loss_func(interaction)
            if isinstance(adversarial_loss, tuple):
                adversarial_loss = sum(adversarial_loss)
        self.scaler.scale(adversarial_loss).backward()
        embedding.data.sub_(delta)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.scheduler is None:
            self._build_scheduler(train_data)
        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        iter_data = (
            tqdm(train_data, total=len(train_data), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink"))
            if show_progress
            else train_data
        )
        after_step = getattr(self.model, "after_optimizer_step", None)
        total_loss = None
        for interaction in iter_data:
            interaction = interaction.to(self.device)
            self.optimizer.zero_grad()
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                losses = loss_func(interaction)
            if isinstance(losses, tuple):
                loss = sum(losses)
                parts = tuple(part.item() for part in losses)
                total_loss = parts if total_loss is None else tuple(map(sum, zip(total_loss, parts)))
            else:
                loss = losses
                total_loss = loss.item() if total_loss is None else total_loss + loss.item()
            self._check_nan(loss)
            self.scaler.scale(loss + sync_loss).backward()
            if self.adversarial == "fgm":
                self._fgm_step(interaction, loss_func)
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1
            if after_step is not None:
                after_step(self.global_step)
        return total_loss

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole's checkpoint, with the model's slim state dict when it offers one."""
        state_dict_of = getattr(self.model, "checkpoint_state_dict", None)
        if state_dict_of is None:
            return super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return None
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": state_dict_of(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }
        # write then rename: a kill during the save never leaves a half-written checkpoint
        partial = f"{saved_model_file}.partial"
        torch.save(state, partial)
        os.replace(partial, saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
        return None
