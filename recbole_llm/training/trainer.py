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
- checkpoints that hold only what trained when the model says so (``checkpoint_state_dict``), written
  without pickle (:mod:`recbole_llm.checkpoint.format`: safetensors, the rest as JSON) and atomically (a
  temporary file, then a rename: a kill during a save leaves the previous file whole);
- resumable training: after every validated epoch a ``<saved_model_file>-latest.pth`` holds the model,
  optimizer, scheduler, scaler, early-stopping state and every random-number state (Python, numpy, torch,
  the training DataLoader's shuffle generator); ``resume_from: <that file>`` continues the run where it
  stopped, through RecBole's ``resume_checkpoint``, and reaches the same results as a run never stopped.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_llm.training import distributed
from recbole_llm.training.augment import SequenceAugmenter
from recbole_llm.checkpoint.loading import load_for_comparison, read_once
from recbole_llm.checkpoint import lineage
from recbole_llm.checkpoint.format import atomic_save
from recbole_llm.errors import ConfigError, RecboleLLMError
from recbole_llm.model.contract import PluginModel
from recbole_llm.settings import choice, number

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def trainer_settings(config: Any) -> tuple[str, float, str | None, str, float | None]:
    """``(lr_scheduler, warmup_ratio, mixed_precision, adversarial, adv_epsilon)`` of a config, checked (one-line
    ConfigError naming key and fix); the patched Config runs it, and the augmentation keys' check, before any
    data is read. The defaults live in properties/PluginTrainer.yaml only: null is a documented "off" or an
    error. ``adv_epsilon`` is None unless ``adversarial`` is fgm."""
    schedule = choice("lr_scheduler", config["lr_scheduler"], SCHEDULES)
    warmup = number("warmup_ratio", config["warmup_ratio"], low=0, high=1, high_open=True, example=0.1)
    precision = config["mixed_precision"]  # null: fp32
    key = None if precision is None else choice("mixed_precision", precision, ("bf16", "fp16", "none"))
    adversarial = config["adversarial"]  # null: off
    adversarial = "none" if adversarial is None else choice("adversarial", adversarial, ("fgm", "none"))
    epsilon = None
    if adversarial == "fgm":
        try:
            epsilon = number("adv_epsilon", config["adv_epsilon"], low=0, low_open=True, example=1.0)
        except ConfigError as error:
            raise ConfigError(f"{error} (with adversarial: fgm)") from None
    SequenceAugmenter(config, "", "")  # its keys
    return schedule, warmup, key, adversarial, epsilon


class PluginTrainer(Trainer):
    r"""RecBole's Trainer with warmup and decay, correct mixed precision, per-step hooks and FGM."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.lr_scheduler_name, self.warmup_ratio, key, self.adversarial, self.adv_epsilon = trainer_settings(config)
        precision = config["mixed_precision"]
        # Mixed precision only on GPU: on CPU autocast is slower for these models (measured) and fp16 unsafe.
        self.autocast_dtype = PRECISIONS[key] if self.device.type == "cuda" else None
        if PRECISIONS[key] is not None and self.autocast_dtype is None:
            self.logger.warning(f"mixed_precision={precision} applies on GPU only: training on {self.device} in fp32")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.scheduler = None
        # sequence augmentation of training batches (augmentation: [crop, mask, reorder]); off by default
        self.augmenter = SequenceAugmenter(config, model.ITEM_SEQ, model.ITEM_SEQ_LEN)
        self.global_step = 0
        self.save_latest = bool(config["save_latest"])
        self.saved_model_file = distributed.share_checkpoint_name(config, self.saved_model_file)
        distributed.share_backbone_hash(config, self.model)
        stem, extension = os.path.splitext(self.saved_model_file)
        self.latest_model_file = f"{stem}-latest{extension}"
        self._resumed_state: dict | None = None
        self._train_data = None

    def _build_scheduler(self, train_data) -> None:
        from transformers import get_scheduler

        # the whole run's steps, also when resuming: the schedule continues where it stopped
        total_steps = max(1, len(train_data) * self.epochs)
        self.scheduler = get_scheduler(
            "constant_with_warmup" if self.lr_scheduler_name == "constant" else self.lr_scheduler_name,
            self.optimizer,
            num_warmup_steps=int(self.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        if self._resumed_state and self._resumed_state.get("scheduler"):
            self.scheduler.load_state_dict(self._resumed_state["scheduler"])

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
        after_step = self.model.after_optimizer_step if isinstance(self.model, PluginModel) else None
        if self.augmenter.active:
            self.augmenter.start_epoch(epoch_idx)
        total_loss = None
        for interaction in iter_data:
            interaction = interaction.to(self.device)
            if self.augmenter.active:  # training batches only: evaluation never comes through here
                interaction = self.augmenter(interaction)
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

    # -----------------------------------------------------------------------------------------------------
    # checkpoints and resuming

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's fit; resumes from ``resume_from`` first (or starts from ``init_from``'s weights), writes the
        latest checkpoint after validations."""
        self._train_data = train_data
        if self.config["resume_from"] and self._resumed_state is None:
            self.resume_checkpoint(self.config["resume_from"])
        elif self.config["init_from"] and self._resumed_state is None:
            from recbole_llm.checkpoint.init_from import initialise

            self.logger.info(initialise(self.model, self.config, train_data._dataset, load_for_comparison))
        if self._resumed_state is not None:
            self._restore_random_state(self._resumed_state.get("random_state"))
            if self.start_epoch >= self.epochs:
                # RecBole's fit would save the model as "epoch -1" over the run's best checkpoint: a finished run
                # resumed has nothing to train, and its best model stays as it is
                self.logger.info(f"resume_from: the run finished its {self.epochs} epochs; nothing to train (raise "
                                 "--epochs to train on)")
                return self.best_valid_score, self.best_valid_result

        def after_validation(epoch_idx, valid_score):
            if saved and self.save_latest:
                self._save_latest(epoch_idx)
            if callback_fn is not None:
                callback_fn(epoch_idx, valid_score)

        result = super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                             callback_fn=after_validation)
        distributed.check_replicas_in_sync(self.config, self.model, self.logger)
        return result

    def _checkpoint_state(self, epoch: int) -> dict:
        plugin = isinstance(self.model, PluginModel)  # RecBole's DDP keeps the bare model in self.model
        return {
            "config": self.config,
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "state_dict": self.model.checkpoint_state_dict() if plugin else self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole's checkpoint (slim when the model offers ``checkpoint_state_dict``), written atomically."""
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        if self.config["local_rank"] == 0:  # rank 0 writes for all ranks, as in RecBole
            atomic_save(self._checkpoint_state(epoch), saved_model_file)
            if verbose:
                self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
        distributed.wait_for_rank_zero(self.config)  # no rank reads the file before it is whole
        return None

    def _save_latest(self, epoch: int) -> None:
        if self.config["local_rank"] != 0:
            distributed.wait_for_rank_zero(self.config)
            return
        state = self._checkpoint_state(epoch)
        state.update({
            "best_model_file": self.saved_model_file,
            "best_valid_result": self.best_valid_result,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
            "random_state": self._random_state(),
        })
        atomic_save(state, self.latest_model_file)
        distributed.wait_for_rank_zero(self.config)

    def resume_checkpoint(self, resume_file):
        """RecBole's resume (model, optimizer, epoch, early stopping); from a ``-latest.pth`` file also the
        scheduler, scaler, best result and random states, and later saves go to the run's own files."""
        resume_file = str(resume_file)
        if not os.path.isfile(resume_file):
            raise RecboleLLMError(f"resume_from '{resume_file}' is not a file; pass a checkpoint this trainer wrote")
        with read_once(resume_file, map_location=self.device) as state:  # RecBole's resume reads this same dict
            super().resume_checkpoint(resume_file)
        self._resumed_state = state
        started_from = lineage.parent(state["config"])
        if started_from is not None:  # a run begun with init_from: its checkpoints keep naming where it started
            lineage.record_parent(self.config, started_from)
        if "best_model_file" in state:  # a latest checkpoint: keep writing the run's two files
            # named after the file resumed from (<stem>-latest.pth -> <stem>.pth), never by the checkpoint
            stem, extension = os.path.splitext(os.path.abspath(resume_file))
            if stem.endswith("-latest"):
                self.saved_model_file = stem[: -len("-latest")] + extension
            self.latest_model_file = resume_file
            self.best_valid_result = state["best_valid_result"]
            self.global_step = int(state["global_step"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])

    def _random_state(self) -> dict:
        name, keys, position, has_gauss, cached = np.random.get_state()
        generator = getattr(self._train_data, "generator", None)
        return {
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "train_data": generator.get_state() if generator is not None else None,
        }

    def _restore_random_state(self, state: dict | None) -> None:
        try:
            self._set_random_state(state)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError):
            raise RecboleLLMError(
                "resume_from holds a damaged random state: resume from a -latest.pth this trainer wrote, or start "
                "the run again"
            ) from None

    def _set_random_state(self, state: dict | None) -> None:
        if not state:
            return
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        generator = getattr(self._train_data, "generator", None)
        if generator is not None and state["train_data"] is not None:
            generator.set_state(state["train_data"])
